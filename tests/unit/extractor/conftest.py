"""Shared fixtures for the extraction core: the team's real DICOM, parsed once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from services.extractor.catalog import InstanceRecord, Rejection, parse_instance


def source_files(root: Path) -> list[Path]:
    """Every file a user would point the extractor at: all of `root` except dcm2niix's `Ref/` outputs."""
    return sorted(
        Path(folder) / name
        for folder, _dirs, names in os.walk(root)
        if "Ref" not in Path(folder).relative_to(root).parts
        for name in names
    )


@pytest.fixture(scope="session")
def shared_files(dicom_root: Path) -> list[Path]:
    return source_files(dicom_root)


@pytest.fixture(scope="session")
def parsed(shared_files: list[Path], dicom_root: Path) -> dict[str, InstanceRecord | Rejection]:
    """source key (path relative to the data root) -> parse result, for every shared file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            str(path.relative_to(dicom_root)): parse_instance(
                path, str(path.relative_to(dicom_root))
            )
            for path in shared_files
        }


@pytest.fixture(scope="session")
def instances(parsed: dict[str, InstanceRecord | Rejection]) -> list[InstanceRecord]:
    return [r for r in parsed.values() if isinstance(r, InstanceRecord)]


@pytest.fixture(scope="session")
def rejections(parsed: dict[str, InstanceRecord | Rejection]) -> dict[str, Rejection]:
    return {key: r for key, r in parsed.items() if isinstance(r, Rejection)}
