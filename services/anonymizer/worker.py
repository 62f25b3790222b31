"""The per-file work of anonymization, run in worker processes: parse, de-identify, write, verify,
upload.

The service process reads each file, learns its patient from the first elements and resolves the
pseudonym and date offset in Postgres (one place decides them); everything that costs CPU happens
here, one file per call, so a study's files spread over every core of the machine. Only the outcome
(status, reason, object key, audit row) travels back: the output bytes go from the worker straight
to object storage.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass, replace
from typing import Literal

import pydicom
from pydicom import Dataset

from services.anonymizer.audit import AuditRow, audit_row
from services.anonymizer.profile import (
    AnonymizationContext,
    Finding,
    Profile,
    ProfileOptions,
    anonymize,
    dicom_bytes,
    load_profile,
    new_uid,
    verify,
)
from shared.sources import ANON_ZONE
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
    data = dicom_bytes(result.dataset)
    excused: list[Finding] = []
    findings = verify(data, result.identifiers, object_key, excused)
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


def deidentify_file(job: FileJob) -> FileOutcome:
    """Parse, de-identify, serialize and verify one file; upload it when it may be released."""
    quiet_pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(job.data), force=True)
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
