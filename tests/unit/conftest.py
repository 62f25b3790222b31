"""Fixtures the unit tests share: the team's real DICOM through the extraction core, once a session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from services.extractor.catalog import InstanceRecord, Rejection, parse_instance
from tests.unit.real_dicom import source_files


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
