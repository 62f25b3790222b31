"""The per-file work of anonymization, run in worker processes: read, parse, de-identify, write,
verify, upload.

The service process passes a batch of a study's file keys and what it has decided about their
subjects (pseudonym and date offset, resolved in Postgres: one place decides them); a worker reads
each file from the source itself, learns its patient from the first elements, and de-identifies,
writes, verifies and uploads it. A file whose patient the service has not resolved yet comes back
unresolved, with the identity to resolve (the service then sends it again). So no file's bytes pass
through the service process, and only small outcomes (status, reason, object key, audit row) travel
back.
"""

from __future__ import annotations

import functools
import io
import logging
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, BinaryIO, Literal

import pydicom
from pydicom import Dataset
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filereader import read_partial

from services.anonymizer.audit import AuditRow, audit_row
from services.anonymizer.profile import (
    AnonymizationContext,
    Finding,
    Profile,
    ProfileOptions,
    anonymize,
    load_profile,
    new_uid,
    verify,
    write_file,
)
from services.anonymizer.repository import Vault
from shared.settings import get_settings
from shared.sources import ANON_ZONE, ObjectSource, Source, SourceFile, open_source
from shared.storage import process_store

log = logging.getLogger(__name__)


def quiet_pydicom() -> None:
    """pydicom's validation warnings quote the offending value (a name, an ID): in a service that
    handles identified data they must not reach the log. Values are written as they are."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


@dataclass(frozen=True)
class FileOutcome:
    """What became of one source file (never an original value in any field)."""

    status: str  # released | quarantined | failed | rejected
    reason: str
    sop_key: str
    object_key: str
    data: bytes | None
    audit: AuditRow | None
    verification_failed: bool = False
    series: str = ""  # the replacement SeriesInstanceUID ("" when the file was not parsed that far)


def uid_value(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().rstrip("\x00")


SOP_INSTANCE_UID = 0x00080018
PATIENT_ID = 0x00100020
ISSUER = 0x00100021


def read_dicom(data: bytes) -> Dataset:
    """A whole file, parsed as the core takes it (element values converted only when used)."""
    return pydicom.dcmread(io.BytesIO(data), force=True)


def converted_apart(ds: Dataset, tags: list[int]) -> Dataset:
    """The elements `tags` of a parsed file, converted in a data set of their own: the file's own
    elements stay as read (so the writer copies what de-identification leaves alone)."""
    out = Dataset()
    for tag in tags:
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            elem = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
        if elem is not None:
            out[tag] = elem
    return out


def parse_until(data: bytes | BinaryIO, last: int, tags: list[int]) -> Dataset:
    """The elements `tags` of a file, parsed no further than the tag `last`."""

    def stop(tag: Any, vr: Any, length: Any) -> bool:
        return int(tag) > last

    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    return read_partial(fp, stop_when=stop, force=True, specific_tags=tags)


def deidentify(
    ds: Dataset,
    context: AnonymizationContext,
    *,
    cohort_id: uuid.UUID,
    folder: str,
    sop_key: str,
) -> FileOutcome:
    """De-identify one parsed file, serialize it and verify the written bytes and the object key.

    The object key is built from replacement UIDs (`new_uid` of the originals) even under Retain
    UIDs, so keys are deterministic and never carry an original value.
    """
    secret = context.secret
    originals = {
        k: uid_value(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    }
    missing = [k for k, v in originals.items() if not v]
    if missing:
        return FileOutcome("rejected", f"no {missing[0]}", sop_key, "", None, None)
    parts = [new_uid(secret, originals[k]) for k in originals]
    object_key = f"{ANON_ZONE}/{cohort_id}/{folder}/{parts[0]}/{parts[1]}/{parts[2]}.dcm"
    series = parts[1]
    result = anonymize(ds, context)
    if result.quarantine is not None:
        row = audit_row(result, "", "quarantined")
        reason = result.quarantine.reason
        return FileOutcome("quarantined", reason, sop_key, "", None, row, series=series)
    written = write_file(result.dataset)
    data = written.data
    excused: list[Finding] = []
    findings = verify(data, result.identifiers, object_key, excused, written.pixel_data)
    if findings:
        where = sorted({f"{f.kind} in {f.location}" for f in findings})
        reason = f"verification found an original {', '.join(where[:5])}"
        row = replace(audit_row(result, "", "failed", excused), reason=reason)
        return FileOutcome(
            "failed", reason, sop_key, "", None, row, verification_failed=True, series=series
        )
    return FileOutcome(
        "released",
        "",
        sop_key,
        object_key,
        data,
        audit_row(result, object_key, "released", excused),
        series=series,
    )


_profiles: dict[ProfileOptions, Profile] = {}  # per worker process


@dataclass(frozen=True)
class FileJob:
    """One file for a worker: its bytes and everything decided about its subject."""

    data: bytes
    options: ProfileOptions  # without the csv mapping (the pseudonym is already resolved)
    secret: bytes
    pseudonym: str
    date_offset_days: int | None
    cohort_id: uuid.UUID
    folder: str
    sop_key: str
    timepoint_label: str | None = None  # ClinicalTrialTimePointID of the file's study
    # upload: to the de-identified zone (the service); return: in the outcome (tests); discard:
    # dropped (benchmarks of the de-identification alone)
    output: Literal["upload", "return", "discard"] = "upload"


def worker_options(options: ProfileOptions) -> ProfileOptions:
    """`options` as a worker needs them: a csv mapping stays in the service process."""
    return options.with_(patient_id=replace(options.patient_id, csv_text=None))


def _profile(options: ProfileOptions) -> Profile:
    if options not in _profiles:
        _profiles[options] = load_profile(options)
    return _profiles[options]


def load_worker_profile(options: ProfileOptions) -> None:
    """Load the profile in this worker before its first file (and pydicom's settings)."""
    quiet_pydicom()
    _profile(options)


def deidentify_file(job: FileJob, parsed: Dataset | None = None) -> FileOutcome:
    """Parse, de-identify, serialize and verify one file; upload it when it may be released.
    `parsed`: `job.data` already parsed (`read_dicom`), so it is not parsed twice."""
    quiet_pydicom()
    try:
        ds = parsed if parsed is not None else read_dicom(job.data)
    except Exception as exc:
        reason = f"not a readable DICOM file ({type(exc).__name__})"
        return FileOutcome("rejected", reason, job.sop_key, "", None, None)
    context = AnonymizationContext(
        _profile(job.options),
        job.secret,
        job.pseudonym,
        date_offset_days=job.date_offset_days,
        timepoint_label=job.timepoint_label,
    )
    try:
        outcome = deidentify(
            ds, context, cohort_id=job.cohort_id, folder=job.folder, sop_key=job.sop_key
        )
    except Exception as exc:  # a malformed element the core cannot handle
        log.warning("file not de-identified", extra={"error": type(exc).__name__})
        reason = f"de-identification error ({type(exc).__name__})"
        return FileOutcome("failed", reason, job.sop_key, "", None, None)
    if outcome.data is not None and job.output == "upload":
        process_store().put_bytes(
            outcome.object_key, outcome.data, content_type="application/dicom"
        )
    return outcome if job.output == "return" else replace(outcome, data=None)


# --- a batch of a study's files, read by the worker itself ----------------------------------------

SubjectKey = tuple[str, str, str]  # (PatientID, IssuerOfPatientID, folder under `folder`, else "")


def subject_key_of(patient_id: str, issuer: str, path: str, strategy: str) -> SubjectKey:
    """What decides a file's subject within a study: its patient, and under `folder` (which
    derives the pseudonym from the path) its folder too."""
    where = str(PurePosixPath(path).parent) if strategy == "folder" else ""
    return patient_id, issuer, where


@dataclass(frozen=True)
class SubjectRef:
    """A subject the service resolved, as a worker needs it."""

    pseudonym: str
    date_offset_days: int | None
    folder: str  # the object-key folder (`plugin.subject_folder`)


@dataclass(frozen=True)
class Unresolved:
    """A file whose subject the service has not resolved yet: the identity to resolve. It travels
    only between the worker and the service process (never to a table, log or event)."""

    patient_id: str
    issuer: str
    path: str


@dataclass(frozen=True)
class StudyBatch:
    """Some files of one study for a worker: where to read them, and the study's subjects resolved
    so far (a reason instead when the patient could not be resolved)."""

    location: str  # the study's source location, opened as the service lists it (`open_source`)
    within: str | None  # the cohort's source, when `location` is a new study's folder
    keys: list[str]
    vault: Vault
    options: ProfileOptions  # `worker_options`
    subjects: dict[SubjectKey, SubjectRef | str]
    cohort_id: uuid.UUID
    timepoint_label: str | None = None
    output: Literal["upload", "return", "discard"] = "upload"


_readers: ThreadPoolExecutor | None = None
READ_AHEAD = 2  # files read while the one before is de-identified (bounded: files can be large)


@functools.lru_cache(maxsize=8)  # per worker process: the studies of the last few runs
def _source(location: str, within: str | None) -> Source:
    return open_source(location, get_settings(), within=within)


def _read_ahead(source: Source, keys: list[str]) -> Iterator[bytes]:
    """The files' bytes in order, the next ones read in threads meanwhile (object storage)."""
    global _readers
    if _readers is None:
        _readers = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="read")
    pending: deque[Future[bytes]] = deque()
    rest = iter(keys)
    for key in rest:
        pending.append(_readers.submit(source.read, key))
        if len(pending) > READ_AHEAD:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def deidentify_batch(batch: StudyBatch) -> list[FileOutcome | Unresolved]:
    """Read each file of the batch, find its subject among those resolved, and de-identify it
    (`deidentify_file`); one result per key, in order."""
    quiet_pydicom()
    source = _source(batch.location, batch.within)
    return [
        _deidentify_read(batch, source, key, data)
        for key, data in zip(batch.keys, _read_ahead(source, batch.keys), strict=True)
    ]


def _deidentify_read(
    batch: StudyBatch, source: Source, key: str, data: bytes
) -> FileOutcome | Unresolved:
    vault = batch.vault
    file_key = vault.key("file", f"{source.location}\x00{key}")
    try:  # parsed once, for its subject and its de-identification
        parsed: Dataset | None = read_dicom(data)
    except Exception:
        parsed = None  # its first elements may still be readable: the subject is resolved as before
    tags = [SOP_INSTANCE_UID, PATIENT_ID, ISSUER]
    try:  # who the file belongs to: the first elements are enough
        head = (
            converted_apart(parsed, tags) if parsed is not None else parse_until(data, ISSUER, tags)
        )
    except Exception as exc:
        reason = f"not a readable DICOM file ({type(exc).__name__})"
        return FileOutcome("rejected", reason, file_key, "", None, None)
    sop = uid_value(head, "SOPInstanceUID")
    sop_key = vault.key("sop", sop) if sop else file_key
    patient_id = str(head.get("PatientID", "") or "")
    issuer = str(head.get("IssuerOfPatientID", "") or "")
    strategy = batch.options.patient_id.strategy
    subject = batch.subjects.get(subject_key_of(patient_id, issuer, key, strategy))
    if subject is None:
        return Unresolved(patient_id, issuer, key)
    if isinstance(subject, str):
        return FileOutcome("failed", f"pseudonym: {subject}", sop_key, "", None, None)
    job = FileJob(
        data=data,
        options=batch.options,
        secret=vault.core_secret,
        pseudonym=subject.pseudonym,
        date_offset_days=subject.date_offset_days,
        cohort_id=batch.cohort_id,
        folder=subject.folder,
        sop_key=sop_key,
        timepoint_label=batch.timepoint_label,
        output=batch.output,
    )
    return deidentify_file(job, parsed)


# --- what a plan reads of each file --------------------------------------------------------------

HEADER_RANGE = 256 * 1024  # bytes read from object storage to find a StudyInstanceUID
STUDY_DATE = 0x00080020
STUDY_UID = 0x0020000D


@dataclass(frozen=True)
class StudyHead:
    """What a plan reads of a file: its study, and the patient and date that study belongs to."""

    study_uid: str
    patient_id: str
    issuer: str
    study_date: str | None


HEAD_TAGS = [STUDY_DATE, PATIENT_ID, ISSUER, STUDY_UID]


def study_head_of(source: Source, f: SourceFile) -> tuple[StudyHead | None, str | None]:
    """(StudyHead, None) of a file, or (None, reason) when it is not a DICOM object of a study.
    Reads only the header up to the study UID (a ranged read on object storage); an entry the
    listing refused (a link out of the roots, a FIFO, ...) is not read, its reason is kept."""
    if f.rejected is not None:
        return None, f.rejected
    try:
        if isinstance(source, ObjectSource):
            full = f"{source.prefix}/{f.key}" if source.prefix else f.key
            head = source.store.get_range(full, 0, min(f.size, HEADER_RANGE), bucket=source.bucket)
            try:
                ds = parse_until(head, STUDY_UID, HEAD_TAGS)
            except Exception:
                ds = Dataset()
            if "StudyInstanceUID" not in ds and f.size > HEADER_RANGE:
                ds = parse_until(source.read(f.key), STUDY_UID, HEAD_TAGS)
        else:  # a folder (or a study's folder within one): read as far as the study UID
            with source.open(f.key) as fh:
                ds = parse_until(fh, STUDY_UID, HEAD_TAGS)
    except Exception as exc:  # pydicom raises many types on non-DICOM input
        return None, f"not a readable DICOM file ({type(exc).__name__})"
    uid = uid_value(ds, "StudyInstanceUID")
    if not uid:
        return None, "no StudyInstanceUID: not a DICOM object of a study"
    date = str(ds.get("StudyDate", "") or "").strip()[:8]
    return StudyHead(
        uid,
        str(ds.get("PatientID", "") or ""),
        str(ds.get("IssuerOfPatientID", "") or ""),
        date if len(date) == 8 and date.isdigit() else None,
    ), None


def study_heads(
    location: str, within: str | None, files: list[SourceFile], threads: int
) -> list[tuple[StudyHead | None, str | None]]:
    """`study_head_of` each file of a plan (in a worker process), `threads` reads in flight."""
    quiet_pydicom()
    source = _source(location, within)
    with ThreadPoolExecutor(max_workers=threads) as readers:
        return list(readers.map(lambda f: study_head_of(source, f), files))
