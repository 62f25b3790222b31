"""The labelled set (tests/data/labels/shared_data.yaml) run through the whole pure sorting path."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel
import yaml
from pydicom.data import get_testdata_file

from services.sorter.rules import (
    Classification,
    Fingerprint,
    classify_batch,
    complete,
    fingerprint_batch,
    load_rules,
)
from shared.catalog import StackSummary
from tests.unit.sorter.stack_builder import build_stacks

LABELS = Path(__file__).resolve().parents[2] / "data" / "labels" / "shared_data.yaml"
NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


@dataclass
class Labelled:
    where: str
    label: dict[str, Any]
    stack: StackSummary
    fingerprint: Fingerprint
    result: Classification

    @property
    def expected(self) -> str:
        return f"{self.label['datatype']}/{self.label['suffix']}"

    @property
    def got(self) -> str:
        return f"{self.result.bids_datatype}/{self.result.bids_suffix}"

    @property
    def right(self) -> bool:
        return self.expected == self.got


# test-data folders inside packages that are optional test dependencies (heudiconv, deid-data)
_OPTIONAL_DATA = {"heudiconv": "tests/data", "deid_data": "data"}


def package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def package_file(package: str, name: str) -> Path:
    if package == "nibabel":
        return NIBABEL_DATA / name
    if package == "pydicom":
        found = get_testdata_file(name)
        if found is None:
            raise FileNotFoundError(name)
        return Path(str(found))
    if package in _OPTIONAL_DATA:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{package} is not installed")
        return Path(spec.origin).parent / _OPTIONAL_DATA[package] / name
    raise ValueError(f"unknown package {package!r}")


def _groups(dicom_root: Path) -> Iterator[tuple[str, list[dict[str, Any]], list[StackSummary]]]:
    labels = yaml.safe_load(LABELS.read_text(encoding="utf-8"))
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for label in labels["shared"]:
        by_folder.setdefault(label["folder"], []).append(label)
    for folder, folder_labels in by_folder.items():
        yield folder, folder_labels, build_stacks((dicom_root / folder).iterdir())
    for label in labels["packages"]:
        if not package_installed(label["package"]):
            continue  # optional test data (heudiconv, deid-data); reported by the accuracy test
        paths = [package_file(label["package"], name) for name in label["files"]]
        yield (
            f"{label['package']}:{','.join(label['files'])}",
            [{**label, "stack": "*"}],
            build_stacks(paths),
        )


def run_labelled_set(dicom_root: Path, profile: str = "standard") -> list[Labelled]:
    """Build, fingerprint, classify and complete every labelled stack; pair it with its label."""
    rules = load_rules(profile)
    pairs: list[tuple[str, dict[str, Any], StackSummary]] = []
    for where, labels, stacks in _groups(dicom_root):
        exact = {label["stack"]: label for label in labels if label["stack"] != "*"}
        fallback = next((label for label in labels if label["stack"] == "*"), None)
        if not stacks:
            raise AssertionError(f"{where}: no stacks built")
        for stack in stacks:
            label = exact.pop(stack.stack_key, None) or fallback
            if label is None:
                raise AssertionError(f"{where}: stack {stack.stack_key!r} has no label")
            pairs.append((where, label, stack))
        if exact:
            raise AssertionError(f"{where}: labels matched no stack: {sorted(exact)}")
    fingerprints = fingerprint_batch(stack for _, _, stack in pairs)
    results = complete(classify_batch(fingerprints, rules), fingerprints, rules)
    return [
        Labelled(where, label, stack, fp, result)
        for (where, label, stack), fp, result in zip(pairs, fingerprints, results, strict=True)
    ]
