"""Accuracy on the labelled real data: >= 95% right datatype+suffix, <= 2% wrong without review."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.unit.sorter.labelled import Labelled, package_installed, run_labelled_set


@pytest.fixture(scope="module")
def labelled(dicom_root: Path) -> list[Labelled]:
    return run_labelled_set(dicom_root)


def _summary(items: list[Labelled]) -> str:
    confusion = Counter((item.expected, item.got) for item in items)
    lines = [f"{n:3d}  {exp:24s} -> {got}" for (exp, got), n in sorted(confusion.items())]
    return "\n".join(lines)


def test_labelled_set_accuracy_and_unreviewed_errors(labelled: list[Labelled]) -> None:
    total = len(labelled)
    right = sum(item.right for item in labelled)
    wrong_unreviewed = [i for i in labelled if not i.right and not i.result.review_required]
    reviewed = sum(item.result.review_required for item in labelled)
    print(
        f"\nlabelled stacks: {total}, right {right} ({right / total:.1%}), "
        f"reviewed {reviewed}, wrong without review {len(wrong_unreviewed)}"
    )
    print(_summary(labelled))
    missing = sorted({p for p in ("heudiconv", "deid_data") if not package_installed(p)})
    if missing:
        print(f"optional labelled data not installed (pip install heudiconv deid-data): {missing}")
    for item in labelled:
        if not item.right:
            print(
                f"WRONG {item.where} {item.stack.stack_key}: {item.expected} -> {item.got} "
                f"review={item.result.review_reasons}"
            )
    assert total >= 50
    assert right / total >= 0.95
    assert len(wrong_unreviewed) / total <= 0.02


def test_labelled_intents_entities_and_vendors(labelled: list[Labelled]) -> None:
    for item in labelled:
        label, result = item.label, item.result
        assert result.intent == label["intent"], (item.where, item.stack.stack_key, result.intent)
        for name, value in (label.get("entities") or {}).items():
            assert result.entities.get(name) == value, (item.where, name, result.entities)
        if result.intent != "excluded":
            assert item.fingerprint.vendor == label["vendor"], (item.where, item.fingerprint.vendor)


def test_review_is_not_asked_on_every_series(labelled: list[Labelled]) -> None:
    images = [i for i in labelled if i.result.intent != "excluded"]
    reviewed = [i for i in images if i.result.review_required]
    assert len(reviewed) / len(images) <= 0.25


def test_confidence_tracks_correctness(labelled: list[Labelled]) -> None:
    """Calibration check on the labelled set: the confident bin is at least as right as the rest."""
    confident = [i for i in labelled if i.result.confidence >= 0.7]
    assert confident and sum(i.right for i in confident) / len(confident) >= 0.97
    for item in labelled:
        assert 0.0 <= item.result.confidence <= 1.0
