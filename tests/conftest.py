"""Fixtures every test may use. Integration fixtures (the real stack) live in tests/integration/."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the team's real scanner DICOM, next to the project (never copied into it)
DICOM_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dicom"
# labelled real DICOM from scanners the code was not tuned on (held out)
DEV_CORPUS_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "dev-corpus"


@pytest.fixture(scope="session")
def dicom_root() -> Path:
    """`../shared/data/dicom`: real multi-vendor DICOM with dcm2niix reference outputs."""
    if not DICOM_ROOT.is_dir():
        raise RuntimeError(
            f"test data missing: {DICOM_ROOT} (the team's shared/ folder must sit next to the project)"
        )
    return DICOM_ROOT


@pytest.fixture(scope="session")
def dev_corpus_root() -> Path:
    """`../shared/data/dev-corpus`: real DICOM from other scanners (`<source>/<series>/`)."""
    if not DEV_CORPUS_ROOT.is_dir():
        raise RuntimeError(f"test data missing: {DEV_CORPUS_ROOT}")
    return DEV_CORPUS_ROOT
