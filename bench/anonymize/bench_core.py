"""Files per second of the de-identification core vs. a bare pydicom read-modify-write loop.

Both loops read the same files from disk, change them and serialize them to memory, in the same run.
The baseline does what a minimal script would: blank a dozen identifying attributes at the top level,
replace the four main UIDs with `pydicom.uid.generate_uid`, drop private tags. The core does the full
PS3.15 profile at every depth, date shift, safe-private cleaning and markers, plus the verification
re-read of its output. The last line is the service's own path on two cores: the parent hands
batches of file keys to a pool of worker processes that read, parse, de-identify, write and verify
each file (`services.anonymizer.worker.deidentify_batch`, as the anonymizer service runs it; the
outputs are dropped where the service would upload them). Goal: that line >= 1.4x the one-core
bare loop.

Usage: `.venv/bin/python bench/anonymize/bench_core.py [FOLDER] [N] [WORKERS]`.
"""

from __future__ import annotations

import io
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from services.anonymizer.profile import (
    AnonymizationContext,
    ProfileOptions,
    anonymize,
    date_offset_days,
    load_profile,
    verify,
    write_file,
)
from services.anonymizer.repository import Vault
from services.anonymizer.worker import (
    ISSUER,
    PATIENT_ID,
    StudyBatch,
    SubjectRef,
    Unresolved,
    deidentify_batch,
    parse_until,
    subject_key_of,
    worker_options,
)

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"
SECRET = b"bench secret"
BATCH = 16  # files per batch, as the service cuts a study
BASELINE_BLANK = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "OperatorsName",
    "StudyID",
    "DeviceSerialNumber",
]


def files_of(folder: Path, limit: int) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                if f.read(132)[128:] == b"DICM":
                    found.append(path)
        if len(found) >= limit:
            break
    return found


def baseline(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in BASELINE_BLANK:
            if keyword in ds:
                ds.data_element(keyword).value = ""  # type: ignore[union-attr]
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            if keyword in ds:
                setattr(ds, keyword, generate_uid())
        ds.remove_private_tags()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return time.perf_counter() - start


def core(paths: list[Path], check: bool) -> float:
    profile = load_profile(ProfileOptions(shift_dates=True))
    offset = date_offset_days(SECRET, "subBENCH")
    start = time.perf_counter()
    for path in paths:
        ctx = AnonymizationContext(profile, SECRET, "subBENCH", date_offset_days=offset)
        result = anonymize(pydicom.dcmread(path), ctx)
        written = write_file(result.dataset)
        if check and verify(written.data, result.identifiers, pixel_data=written.pixel_data):
            raise SystemExit(f"verification failed on {path}")
    return time.perf_counter() - start


def service_path(folder: Path, paths: list[Path], pool: ProcessPoolExecutor) -> float:
    """Seconds for the worker pool to read and de-identify `paths` (keys under `folder`) in the
    service's batches, every patient resolved beforehand to one pseudonym."""
    options = worker_options(ProfileOptions(shift_dates=True))
    subject = SubjectRef("subBENCH", date_offset_days(SECRET, "subBENCH"), "subBENCH")
    keys = [path.relative_to(folder).as_posix() for path in paths]
    heads = [parse_until(path.read_bytes(), ISSUER, [PATIENT_ID, ISSUER]) for path in paths]
    subjects: dict[tuple[str, str, str], SubjectRef | str] = {
        subject_key_of(str(h.get("PatientID", "")), str(h.get("IssuerOfPatientID", "")), k, ""): (
            subject
        )
        for h, k in zip(heads, keys, strict=True)
    }
    vault = Vault()
    cohort = uuid.uuid4()
    start = time.perf_counter()
    futures = [
        pool.submit(
            deidentify_batch,
            StudyBatch(
                location=str(folder),
                within=None,
                keys=keys[i : i + BATCH],
                vault=vault,
                options=options,
                subjects=subjects,
                cohort_id=cohort,
                output="discard",
            ),
        )
        for i in range(0, len(keys), BATCH)
    ]
    for future in futures:
        for outcome in future.result():
            # rejected (no study UID) and quarantined are verdicts; nothing may stay unresolved
            if isinstance(outcome, Unresolved) or outcome.status == "failed":
                raise SystemExit(f"not de-identified: {outcome}")
    return time.perf_counter() - start


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dcm_qa_deident" / "In"
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    paths = files_of(folder, limit)
    # what the workers read the files and key them with, as the service's settings give them
    os.environ.setdefault("COHORTFLOW_DATA_ROOTS", str(folder.resolve()))
    os.environ.setdefault("COHORTFLOW_PROJECT_SECRET", SECRET.decode())
    baseline(paths[:5])  # warm the page cache and imports for both
    core(paths[:5], check=False)
    with ProcessPoolExecutor(workers) as pool:
        service_path(folder, paths[: workers * 4], pool)  # start the workers, load their profile
        # interleaved, best of three: the machine is shared, the best run is the least disturbed
        runs = [
            (
                baseline(paths),
                core(paths, False),
                core(paths, True),
                service_path(folder, paths, pool),
            )
            for _ in range(3)
        ]
    t_base = min(r[0] for r in runs)
    t_core = min(r[1] for r in runs)
    t_full = min(r[2] for r in runs)
    t_service = min(r[3] for r in runs)
    n = len(paths)
    print(f"{n} files from {folder}")
    print(f"bare pydicom read-modify-write : {n / t_base:8.1f} files/s")
    print(
        f"cohortflow anonymize + write   : {n / t_core:8.1f} files/s  ({t_base / t_core:.2f} x bare speed)"
    )
    print(
        f"  ... + verify of the output   : {n / t_full:8.1f} files/s  ({t_base / t_full:.2f} x bare speed)"
    )
    print(
        f"service path, {workers} worker processes: {n / t_service:8.1f} files/s"
        f"  ({t_base / t_service:.2f} x the one-core bare loop; goal >= 1.4x on two cores)"
    )


if __name__ == "__main__":
    main()
