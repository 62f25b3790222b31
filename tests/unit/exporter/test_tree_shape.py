"""Which export options a scoped export must share with the previous tree to carry its other
subjects (ADR 0024): those that decide which files exist and how they are named, not where the
tree is copied or whether unchanged stacks are converted again."""

from __future__ import annotations

from services.exporter.selection import ExportOptions
from shared.stage_config import ExportConfig


def shape(**config: object) -> dict[str, object]:
    return ExportOptions.from_config(ExportConfig.model_validate(config)).tree_shape()


def test_overwrite_and_destination_do_not_change_the_tree() -> None:
    assert shape() == shape(overwrite="overwrite")
    assert shape() == shape(destination="s3://elsewhere/tree")


def test_naming_and_selection_options_do() -> None:
    assert shape() != shape(layout="flat")
    assert shape() != shape(outputModes=["nii.gz", "dcm"])
    assert shape() != shape(groupSyMRI=not ExportConfig().groupSyMRI)


def test_the_order_of_listed_options_does_not() -> None:
    assert shape(outputModes=["nii.gz", "dcm"]) == shape(outputModes=["dcm", "nii.gz"])
