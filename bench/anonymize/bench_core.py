"""Files per second of the de-identification core vs. a bare pydicom read-modify-write loop.

Both loops read the same files from disk, change them and serialize them to memory, in the same run.
The baseline does what a minimal script would: blank a dozen identifying attributes at the top level,
replace the four main UIDs with `pydicom.uid.generate_uid`, drop private tags. The core does the full
PS3.15 profile at every depth, date shift, safe-private cleaning and markers, plus the verification
re-read of its output. Usage: `.venv/bin/python bench/anonymize/bench_core.py [FOLDER] [N]`.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from services.anonymizer.profile import (
    AnonymizationContext,
    ProfileOptions,
    anonymize,
    date_offset_days,
    dicom_bytes,
    load_profile,
    verify,
)

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"
SECRET = b"bench secret"
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
        data = dicom_bytes(result.dataset)
        if check and verify(data, result.identifiers):
            raise SystemExit(f"verification failed on {path}")
    return time.perf_counter() - start


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dcm_qa_deident" / "In"
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    paths = files_of(folder, limit)
    baseline(paths[:5])  # warm the page cache and imports for both
    core(paths[:5], check=False)
    # interleaved, best of three: the machine is shared, the best run is the least disturbed
    runs = [(baseline(paths), core(paths, check=False), core(paths, check=True)) for _ in range(3)]
    t_base = min(r[0] for r in runs)
    t_core = min(r[1] for r in runs)
    t_full = min(r[2] for r in runs)
    n = len(paths)
    print(f"{n} files from {folder}")
    print(f"bare pydicom read-modify-write : {n / t_base:8.1f} files/s")
    print(
        f"cohortflow anonymize + write   : {n / t_core:8.1f} files/s  ({t_base / t_core:.2f} x bare speed)"
    )
    print(
        f"  ... + verify of the output   : {n / t_full:8.1f} files/s  ({t_base / t_full:.2f} x bare speed)"
    )


if __name__ == "__main__":
    main()
