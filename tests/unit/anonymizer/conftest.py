"""Shared pieces of the anonymizer core tests: a project secret and an anonymize-and-write step."""

from __future__ import annotations

import functools
from pathlib import Path

import pydicom
import pytest

from services.anonymizer.profile import (
    AnonymizationContext,
    AnonymizationResult,
    Profile,
    ProfileOptions,
    anonymize,
    date_offset_days,
    dicom_bytes,
    load_profile,
)

SECRET = b"unit-test project secret"


def is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom(p))


@functools.cache
def compiled_profile(options: ProfileOptions) -> Profile:
    """Table E.1-1 compiled once per options, as the service keeps one per cohort config."""
    return load_profile(options)


def run(
    path: Path, options: ProfileOptions | None = None, pseudonym: str = "subTEST01", **ctx: object
) -> tuple[AnonymizationResult, bytes]:
    opts = options or ProfileOptions(shift_dates=True)
    offset = date_offset_days(SECRET, pseudonym) if opts.shift_dates else None
    context = AnonymizationContext(
        compiled_profile(opts),
        SECRET,
        pseudonym,
        date_offset_days=offset,
        **ctx,  # type: ignore[arg-type]
    )
    result = anonymize(pydicom.dcmread(path), context)
    return result, dicom_bytes(result.dataset)


@pytest.fixture(scope="session")
def deident_files(dicom_root: Path) -> list[Path]:
    return dicom_files(dicom_root / "dcm_qa_deident" / "In")
