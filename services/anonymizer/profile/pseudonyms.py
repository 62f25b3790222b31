"""Patient pseudonyms: one per patient, allocated once, never shared by two patients.

The store never sees an original PatientID: it is keyed by `subject_key` (HMAC of the project secret
and the PatientID qualified by its issuer). The anonymizer service backs `PseudonymStore` with
Postgres; `MemoryPseudonymStore` is the same contract in memory for tests and single runs.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from services.anonymizer.profile.options import PatientIdOptions
from shared.subjects import missing_patient_id


class PseudonymError(ValueError):
    """A patient cannot be given a safe pseudonym (unmapped, collision, pass-through); the file is
    refused rather than released with its original identity."""


class PseudonymCollision(PseudonymError):
    """Two different patients would share one pseudonym."""


class PseudonymStore(Protocol):
    """Where pseudonyms are kept. Implementations must make `claim` atomic (a unique constraint on
    the pseudonym and on the subject key)."""

    async def get(self, subject_key: str) -> str | None:
        """The pseudonym already given to this subject, if any."""

    async def claim(self, subject_key: str, pseudonym: str) -> str:
        """Record `pseudonym` for `subject_key` unless the subject already has one; return the
        subject's pseudonym. Raise `PseudonymCollision` if another subject holds `pseudonym`."""

    async def next_number(self, scope: str) -> int:
        """The next number of a sequence (1, 2, ...), never handed out twice."""


class MemoryPseudonymStore:
    """`PseudonymStore` in memory (tests, one-off runs)."""

    def __init__(self) -> None:
        self.by_subject: dict[str, str] = {}
        self.by_pseudonym: dict[str, str] = {}
        self.counters: dict[str, int] = {}

    async def get(self, subject_key: str) -> str | None:
        return self.by_subject.get(subject_key)

    async def claim(self, subject_key: str, pseudonym: str) -> str:
        existing = self.by_subject.get(subject_key)
        if existing is not None:
            return existing
        holder = self.by_pseudonym.get(pseudonym)
        if holder is not None and holder != subject_key:
            raise PseudonymCollision(f"pseudonym {pseudonym!r} already belongs to another patient")
        self.by_subject[subject_key] = pseudonym
        self.by_pseudonym[pseudonym] = subject_key
        return pseudonym

    async def next_number(self, scope: str) -> int:
        self.counters[scope] = self.counters.get(scope, 0) + 1
        return self.counters[scope]


@dataclass(frozen=True)
class PatientIdentity:
    """What stands for a patient: the PatientID (with its issuer), or, when the PatientID names
    nobody (`shared.subjects`), the study it came with. `basis` says which, in words the audit
    records."""

    text: str  # what the subject key and a hashed pseudonym are derived from
    issuer: str
    basis: str

    @property
    def from_patient_id(self) -> bool:
        return self.basis == "PatientID"


def patient_identity(patient_id: str, issuer: str, study_ref: str) -> PatientIdentity:
    """The identity of a file's patient. A missing, punctuation-only or placeholder PatientID falls
    back to the study (`study_ref`: a stable, keyed reference of the StudyInstanceUID): two studies
    without a PatientID never merge into one subject, since no study belongs to two patients, and
    the same study gets the same subject in every run and cohort of the project."""
    reason = missing_patient_id(patient_id)
    if reason is None:
        return PatientIdentity(patient_id.strip(), issuer.strip(), "PatientID")
    if not study_ref:
        raise PseudonymError(f"{reason}, and no study to stand for the patient")
    return PatientIdentity(f"study:{study_ref}", "", f"StudyInstanceUID ({reason})")


def identity_of(
    patient_id: str,
    issuer: str,
    *,
    opts: PatientIdOptions,
    relative_path: str = "",
    study_ref: str = "",
) -> PatientIdentity:
    """The identity a subject is keyed by under `opts`: `patient_identity`, except that under the
    `folder` strategy a patient without a usable PatientID is its folder's label (all studies of
    one folder are one subject, as the strategy promises)."""
    missing = missing_patient_id(patient_id)
    if missing and opts.strategy == "folder":
        label = folder_pseudonym(relative_path, opts)
        return PatientIdentity(f"folder:{label}", "", f"folder ({missing})")
    return patient_identity(patient_id, issuer, study_ref)


def subject_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """Stable key of a patient for the store: HMAC(secret, issuer \\ PatientID), hex."""
    if not secret:
        raise ValueError("subject_key needs the project secret")
    message = f"patient:{issuer.strip()}\\{patient_id.strip()}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def hashed_pseudonym(secret: bytes, patient_id: str, issuer: str, prefix: str, bits: int) -> str:
    """`prefix` + base32 (lower case, no padding) of the first `bits` bits of the subject key."""
    if bits < 64:
        raise ValueError("a hashed pseudonym needs at least 64 bits")
    raw = bytes.fromhex(subject_key(secret, patient_id, issuer))[: (bits + 7) // 8]
    text = base64.b32encode(raw).decode().rstrip("=").lower()
    return f"{prefix}{text[: (bits + 4) // 5]}"


def _sanitize(label: str) -> str:
    """BIDS labels are alphanumeric."""
    return re.sub(r"[^A-Za-z0-9]", "", label)


def folder_pseudonym(relative_path: str, opts: PatientIdOptions) -> str:
    """The subject ID taken from the file's path: `folder_regex`'s first group in the path component
    at `folder_depth`, else `folder_fallback` formatted with `{folder}`; alphanumeric only."""
    parts = PurePosixPath(relative_path.replace("\\", "/")).parts[:-1]
    if opts.folder_depth >= len(parts):
        raise PseudonymError(
            f"patient_id.folder_depth {opts.folder_depth} is deeper than the file's folders"
        )
    folder = parts[opts.folder_depth]
    label = ""
    if opts.folder_regex:
        match = re.search(opts.folder_regex, folder)
        if match:
            label = match.group(1) if match.groups() else match.group(0)
    if not label and opts.folder_fallback is not None:
        label = opts.folder_fallback.format(folder=folder)
    elif not label and not opts.folder_regex:
        label = folder
    label = _sanitize(label)
    if not label:
        raise PseudonymError("the folder gives no subject ID (regex did not match, no fallback)")
    return f"{opts.prefix}{label}" if opts.prefix and not label.startswith(opts.prefix) else label


def read_mapping(csv_text: str) -> dict[str, str]:
    """Parse a mapping file (`original,pseudonym`, header optional); duplicate originals or two
    originals mapped to one pseudonym are refused."""
    mapping: dict[str, str] = {}
    taken: dict[str, str] = {}
    for row in csv.reader(io.StringIO(csv_text)):
        if len(row) < 2 or not row[0].strip():
            continue
        original, pseudonym = row[0].strip(), _sanitize(row[1].strip())
        if original.lower() in ("original", "patient_id", "patientid") and not mapping:
            continue
        if not pseudonym:
            raise PseudonymError("a mapping row has an empty pseudonym")
        if original in mapping and mapping[original] != pseudonym:
            raise PseudonymError("mapping file gives one patient two pseudonyms")
        if pseudonym in taken and taken[pseudonym] != original:
            raise PseudonymCollision(f"mapping file gives pseudonym {pseudonym!r} to two patients")
        mapping[original] = pseudonym
        taken[pseudonym] = original
    return mapping


async def pseudonymize_patient_id(
    patient_id: str,
    *,
    opts: PatientIdOptions,
    secret: bytes,
    store: PseudonymStore,
    issuer: str = "",
    relative_path: str = "",
    mapping: dict[str, str] | None = None,
    study_ref: str = "",
) -> str:
    """The pseudonym of a patient under the configured strategy, allocated once through `store`.

    A PatientID that names nobody (`missing_patient_id`) has a defined answer per strategy:
    `hash` and `sequential` key the subject by the study (`patient_identity`), `folder` by its
    folder label, `csv` refuses (a mapping file maps PatientIDs; it cannot map nothing). Raises
    `PseudonymError` when the patient is unmapped (`csv` with `unmapped=error`), when the result
    equals the original ID (a pass-through), or on a collision with another patient. With `none`
    the original ID is returned as is.
    """
    original = patient_id.strip()
    if opts.strategy == "none":
        return original
    missing = missing_patient_id(original)
    if missing and opts.strategy == "csv":
        raise PseudonymError(
            f"{missing}: the csv strategy maps PatientIDs, so this study cannot be mapped"
            " (add the study's patient to the mapping or choose hash/sequential/folder)"
        )
    identity = identity_of(
        original, issuer, opts=opts, relative_path=relative_path, study_ref=study_ref
    )
    if opts.strategy == "folder":
        candidate = folder_pseudonym(relative_path, opts)
    key = subject_key(secret, identity.text, identity.issuer)
    existing = await store.get(key)
    # allocated once: a patient who already has a pseudonym in this project keeps it under the
    # strategies that derive one (sequential, hash); csv and folder name it explicitly, so a
    # different answer there is a conflict to refuse
    if opts.strategy in ("sequential", "hash") and existing is not None:
        return existing
    if opts.strategy == "sequential":
        number = await store.next_number(f"sequential:{opts.prefix}")
        candidate = f"{opts.prefix}{number:0{opts.digits}d}"
    elif opts.strategy == "hash":
        candidate = hashed_pseudonym(
            secret, identity.text, identity.issuer, opts.prefix, opts.hash_bits
        )
    elif opts.strategy == "csv":
        table = mapping if mapping is not None else read_mapping(opts.csv_text or "")
        if original in table:
            candidate = table[original]
        elif opts.unmapped == "hash":
            candidate = hashed_pseudonym(secret, original, issuer, opts.prefix, opts.hash_bits)
        else:
            raise PseudonymError("patient not in the mapping file (patient_id.unmapped = error)")
    if existing is not None and existing != candidate:
        raise PseudonymError(
            f"this patient already has pseudonym {existing!r}; the {opts.strategy} strategy now "
            f"gives {candidate!r}"
        )
    if not missing and candidate.lower() == original.lower():
        raise PseudonymError("the pseudonym would equal the original PatientID")
    return await store.claim(key, candidate)
