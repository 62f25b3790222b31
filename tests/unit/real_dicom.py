"""The team's real DICOM, read once per test process for every core's tests.

The extraction core's tests and the sorter's checks through the real extractor read the same ~2000
files of the shared data; each pass over them costs seconds. They share one parse (the `parsed`
fixture in `tests/unit/conftest.py`) and pick their folders from it here. What it holds is shared
between tests: read it, never change it.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.extractor.catalog import InstanceRecord, Rejection


def source_files(root: Path) -> list[Path]:
    """Every file a user would point the extractor at: all of `root` except dcm2niix's `Ref/` outputs."""
    return sorted(
        Path(folder) / name
        for folder, _dirs, names in os.walk(root)
        if "Ref" not in Path(folder).relative_to(root).parts
        for name in names
    )


def records_in(
    parsed: dict[str, InstanceRecord | Rejection], folder: str, *, recursive: bool = False
) -> list[InstanceRecord | Rejection]:
    """The parse results of the files directly in `folder` (a key prefix), or anywhere below it."""
    prefix = folder.rstrip("/") + "/"
    return [
        result
        for key, result in parsed.items()
        if key.startswith(prefix) and (recursive or "/" not in key[len(prefix) :])
    ]
