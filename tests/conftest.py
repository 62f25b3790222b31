"""Fixtures every test may use. Integration fixtures (the real stack) live in tests/integration/."""

from __future__ import annotations

import itertools
import re
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


# ---- the fast loop ---------------------------------------------------------------------------

INTEGRATION_TESTS = Path(__file__).resolve().parent / "integration"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With a `-m` that leaves out every integration test, `tests/integration/` is not collected at
    all: each of its tests is marked `integration` (its conftest), and importing its modules alone
    costs about 5 s of CPU time per process."""
    if collection_path == INTEGRATION_TESTS and _excludes_integration(config.option.markexpr):
        return True
    return None


def _excludes_integration(markexpr: str) -> bool:
    """Whether the `-m` expression is false for every test marked `integration` (any other marks)."""
    if not markexpr:
        return False
    from _pytest.mark.expression import Expression  # how pytest itself evaluates `-m`

    expression = Expression.compile(markexpr)
    names = sorted(set(re.findall(r"[A-Za-z_][\w.]*", markexpr)) - {"and", "or", "not"})
    others = [name for name in names if name != "integration"]
    for values in itertools.product((False, True), repeat=len(others)):
        marks = {"integration"} | {name for name, on in zip(others, values, strict=True) if on}
        if expression.evaluate(lambda name, /, marks=marks, **_kwargs: name in marks):
            return False
    return True
