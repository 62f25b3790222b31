"""A retracted study's stacks are left out of the export plan, with the retraction's reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.exporter.bids import ExportStack
from services.exporter.selection import leave_out_retracted
from shared.catalog import StackSummary


def _stack(study: str, series: str) -> ExportStack:
    summary = StackSummary(
        subject_id="P1", study_instance_uid=study, series_instance_uid=series, stack_key="MR|TE=5"
    )
    return ExportStack(summary=summary, subject="01", datatype="anat", suffix="T1w")


def test_stacks_of_a_retracted_study_are_left_out_with_the_reason() -> None:
    kept_a, gone_b, gone_c = _stack("1.1", "1.1.1"), _stack("1.2", "1.2.1"), _stack("1.2", "1.2.2")
    stacks = [(kept_a, {"intent": "anat"}), (gone_b, {}), (gone_c, {})]
    kept, reasons = leave_out_retracted(stacks, {"1.2": "retracted by /pacs: consent withdrawn"})
    assert [s.key for s, _ in kept] == [kept_a.key]
    assert reasons == {
        gone_b.key: "study retracted by /pacs: consent withdrawn",
        gone_c.key: "study retracted by /pacs: consent withdrawn",
    }


def test_nothing_retracted_leaves_everything() -> None:
    stacks: list[tuple[ExportStack, Mapping[str, Any]]] = [(_stack("1.1", "1.1.1"), {})]
    assert leave_out_retracted(stacks, {}) == (stacks, {})
