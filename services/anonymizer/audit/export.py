"""Build and encrypt the audit export (`audit_export.format`: `encrypted_excel` or `csv`).

The audit lists, per file, the attribute keywords and what was done to them (removed, emptied, dummy,
cleaned, shifted, uid-replaced, pseudonymized, kept...), never an original value; the one exception
is its purpose, the subject sheet: original PatientID -> pseudonym (and the date offset), which is
why the whole export is encrypted with a password the user supplies.

- `encrypted_excel`: an .xlsx written with openpyxl and encrypted with msoffcrypto-tool (ECMA-376
  Agile encryption), which Excel and LibreOffice open with the password.
- `csv`: a small self-describing container: the line `COHORTFLOW-AUDIT 1`, a JSON header line (KDF
  scrypt with its parameters and random salt, cipher AES-256-GCM with its nonce, content type) and
  the ciphertext; the header is authenticated as associated data. `decrypt_audit` reads both.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msoffcrypto
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from msoffcrypto.format.ooxml import OOXMLFile
from openpyxl import Workbook

from services.anonymizer.profile.engine import AnonymizationResult
from services.anonymizer.profile.verify import Finding
from shared.vocabulary import AUDIT_FORMATS

MAGIC = b"COHORTFLOW-AUDIT 1\n"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSWORD = 8


class AuditPasswordError(ValueError):
    """No password, a too short one, or the wrong one for this audit file."""


@dataclass(frozen=True)
class SubjectRow:
    """The re-identification key of one subject (the only original values in the audit)."""

    original_patient_id: str
    pseudonym: str
    date_offset_days: int | None = None
    # what the pseudonym was derived from: "PatientID", or the study or folder when the PatientID
    # named nobody (with the reason)
    pseudonym_basis: str = "PatientID"


@dataclass(frozen=True)
class AuditRow:
    """One output file: where it went and what was done, by attribute keyword and action."""

    pseudonym: str
    study_instance_uid: str  # the new (de-identified) UID
    series_instance_uid: str
    sop_instance_uid: str
    object_key: str
    status: str  # released | quarantined | failed
    reason: str  # quarantine reason or failure, "" otherwise
    removed: str
    emptied: str
    replaced: str  # dummy, pseudonymized, uid-replaced
    cleaned: str  # cleaned text, shifted dates
    kept: str  # kept by option or category (incl. safe private)
    # verification: hits excused as coincidences (where, e.g. "value in Manufacturer"), and how
    # many identifying values were too short or generic to search (never silently skipped)
    excused: str = ""
    unsearched_values: int = 0


def _join(actions: Iterable[tuple[str, str]], wanted: set[str]) -> str:
    return " ".join(sorted({k for k, a in actions if a in wanted}))


def audit_row(
    result: AnonymizationResult,
    object_key: str,
    status: str = "",
    excused: Sequence[Finding] = (),
) -> AuditRow:
    """The audit row of one anonymized file (keywords and actions only)."""
    ds = result.dataset
    acts = list(result.actions)
    return AuditRow(
        pseudonym=str(ds.get("PatientID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        object_key=object_key,
        status=status or ("released" if result.released else "quarantined"),
        reason=result.quarantine.reason if result.quarantine else "",
        removed=_join(acts, {"removed"}),
        emptied=_join(acts, {"emptied"}),
        replaced=_join(acts, {"dummy", "pseudonymized", "uid-replaced", "timepoint-label"}),
        cleaned=_join(acts, {"cleaned", "shifted", "embedded-uids-replaced"}),
        kept=_join(acts, {"kept", "kept-safe", "kept-category"}),
        excused=" ".join(sorted({f"{f.kind} in {f.location}" for f in excused})),
        unsearched_values=result.identifiers.short_values,
    )


FILE_COLUMNS = list(AuditRow.__dataclass_fields__)
SUBJECT_COLUMNS = list(SubjectRow.__dataclass_fields__)


def _check_password(password: str | None) -> str:
    if not password or len(password) < MIN_PASSWORD:
        raise AuditPasswordError(
            f"the audit export needs a password of at least {MIN_PASSWORD} characters"
        )
    return password


def _csv_text(subjects: Sequence[SubjectRow], files: Sequence[AuditRow]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["section", *SUBJECT_COLUMNS])
    for s in subjects:
        writer.writerow(
            [
                "subject",
                s.original_patient_id,
                s.pseudonym,
                s.date_offset_days or "",
                s.pseudonym_basis,
            ]
        )
    writer.writerow(["section", *FILE_COLUMNS])
    for f in files:
        writer.writerow(["file", *(getattr(f, c) for c in FILE_COLUMNS)])
    return out.getvalue().encode("utf-8")


def _xlsx(subjects: Sequence[SubjectRow], files: Sequence[AuditRow]) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "subjects"
    sheet.append(SUBJECT_COLUMNS)
    for s in subjects:
        sheet.append([s.original_patient_id, s.pseudonym, s.date_offset_days, s.pseudonym_basis])
    files_sheet = book.create_sheet("files")
    files_sheet.append(FILE_COLUMNS)
    for f in files:
        files_sheet.append([getattr(f, c) for c in FILE_COLUMNS])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode("utf-8"))


def _encrypt_container(plain: bytes, password: str, content: str) -> bytes:
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "salt": base64.b64encode(salt).decode(),
        "cipher": "AES-256-GCM",
        "nonce": base64.b64encode(nonce).decode(),
        "content": content,
    }
    head = json.dumps(header, sort_keys=True).encode() + b"\n"
    key = _derive(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return MAGIC + head + AESGCM(key).encrypt(nonce, plain, MAGIC + head)


def write_audit(
    subjects: Sequence[SubjectRow], files: Sequence[AuditRow], fmt: str, password: str
) -> bytes:
    """The encrypted audit export in `fmt` (`encrypted_excel` -> .xlsx, `csv` -> container)."""
    password = _check_password(password)
    if fmt == "encrypted_excel":
        plain = io.BytesIO(_xlsx(subjects, files))
        encrypted = io.BytesIO()
        OOXMLFile(plain).encrypt(password, encrypted)
        return encrypted.getvalue()
    if fmt == "csv":
        return _encrypt_container(_csv_text(subjects, files), password, "text/csv")
    raise ValueError(f"audit_export.format must be one of {list(AUDIT_FORMATS)}, not {fmt!r}")


def decrypt_audit(data: bytes, password: str) -> bytes:
    """The plain audit (CSV text, or the .xlsx bytes of an encrypted workbook).

    Raises `AuditPasswordError` for a wrong password and `ValueError` for a file that is not an audit.
    """
    if not password:
        raise AuditPasswordError("a password is needed to open the audit")
    if data.startswith(OLE_MAGIC):
        office = msoffcrypto.OfficeFile(io.BytesIO(data))
        out = io.BytesIO()
        try:
            office.load_key(password=password, verify_password=True)
            office.decrypt(out)
        except Exception as exc:  # msoffcrypto raises several types for a bad key
            raise AuditPasswordError("wrong password for this audit workbook") from exc
        return out.getvalue()
    if not data.startswith(MAGIC):
        raise ValueError("not a Cohortflow audit file")
    rest = data[len(MAGIC) :]
    newline = rest.index(b"\n") + 1
    head, body = rest[:newline], rest[newline:]
    header = json.loads(head)
    kdf = header["kdf"]
    if kdf.get("name") != "scrypt" or header.get("cipher") != "AES-256-GCM":
        raise ValueError("unsupported audit container (kdf/cipher)")
    key = _derive(password, base64.b64decode(header["salt"]), kdf["n"], kdf["r"], kdf["p"])
    try:
        return AESGCM(key).decrypt(base64.b64decode(header["nonce"]), body, MAGIC + head)
    except InvalidTag as exc:
        raise AuditPasswordError("wrong password (or the audit file was altered)") from exc
