"""What the integration tests need to know about a folder of real DICOM."""

from __future__ import annotations

from pathlib import Path

import pydicom


def study_uid(folder: Path) -> str:
    """The StudyInstanceUID of the first readable DICOM file under `folder` (in name order)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            except Exception:
                continue
    raise AssertionError(f"no DICOM under {folder}")
