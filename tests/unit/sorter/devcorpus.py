"""The team's dev-corpus (labelled real DICOM from scanners the rules were not tuned on), located
beside the project like the shared DICOM (`tests/conftest.py`), and run through the accuracy bench."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from tests.conftest import DICOM_ROOT

DEV_CORPUS = DICOM_ROOT.parent / "dev-corpus"
LABELS_TSV = DEV_CORPUS / "labels.tsv"
_BENCH = Path(__file__).resolve().parents[3] / "bench" / "classify" / "accuracy.py"


@cache
def accuracy_bench() -> ModuleType:
    """bench/classify/accuracy.py as a module (the bench is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("classify_accuracy", _BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def require_dev_corpus() -> Path:
    if not LABELS_TSV.is_file():
        raise RuntimeError(f"test data missing: {LABELS_TSV} (the team's shared/ folder)")
    return DEV_CORPUS
