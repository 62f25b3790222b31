"""The envelope and the topic registry: the contract every service reads and writes."""

from __future__ import annotations

import uuid

import pytest

from shared import topics
from shared.events import (
    CohortRef,
    Envelope,
    StageCompleted,
    StageRequested,
    WorkItem,
    work_left_behind,
)
from shared.topics import STAGE_ORDER, Stage

COHORT = CohortRef(id=uuid.uuid4(), name="c1", source_path="/data/c1")


def test_an_envelope_survives_the_wire_and_opens_as_its_payload() -> None:
    job = uuid.uuid4()
    payload = StageRequested(stage=Stage.sorting, cohort=COHORT, config={"profile": "clinical"})
    envelope = Envelope.wrap(payload, source="gateway", cohort_id=COHORT.id, job_id=job)
    back = Envelope.model_validate_json(envelope.model_dump_json())
    assert (back.type, back.version, back.source, back.job_id) == (
        "StageRequested",
        1,
        "gateway",
        job,
    )
    assert back.open(StageRequested) == payload


def test_opening_as_the_wrong_type_says_what_it_is() -> None:
    envelope = Envelope.wrap(StageRequested(stage=Stage.export, cohort=COHORT), source="x")
    with pytest.raises(ValueError, match="expected a StageCompleted event, got StageRequested"):
        envelope.open(StageCompleted)


def test_fields_a_newer_producer_adds_are_kept_not_refused() -> None:
    data = Envelope.wrap(StageRequested(stage=Stage.export, cohort=COHORT), source="x")
    raw = data.model_dump(mode="json")
    raw["trace"] = "abc"
    raw["payload"]["priority"] = 5
    envelope = Envelope.model_validate(raw)
    opened = envelope.open(StageRequested)
    assert envelope.model_extra == {"trace": "abc"}
    assert opened.model_extra == {"priority": 5}


def test_every_stage_has_its_five_topics_and_no_name_is_used_twice() -> None:
    names = topics.all_topics()
    # six of the system (progress, control, studies in, deletions, events out, retractions)
    # and five per stage
    assert len(names) == len(set(names)) == 6 + 5 * len(STAGE_ORDER)
    for stage in Stage:
        assert {
            topics.requested(stage),
            topics.items(stage),
            topics.completed(stage),
            topics.failed(stage),
            topics.dlq(stage),
        } <= set(names)
    assert topics.items("sorting") == "cohortflow.sorting.items"
    assert topics.dlq(Stage.export) == "cohortflow.dlq.export"
    assert set(topics.STAGE_SERVICE) == set(STAGE_ORDER)


@pytest.mark.parametrize(
    ("total", "failed", "summary", "expected"),
    [
        (4, 0, {}, None),
        (4, 1, {}, "completed with work left behind: 1 of 4 work items failed"),
        (
            2,
            0,
            {
                "left_behind": 3,
                "refused": [{"reason": "burned-in text", "files": 3, "studies": 1}],
            },
            "completed with work left behind: 3 files left behind, "
            "by reason: burned-in text (3 in 1 studies)",
        ),
    ],
)
def test_work_left_behind_says_why_a_completed_run_is_not_clean(
    total: int, failed: int, summary: dict[str, object], expected: str | None
) -> None:
    assert work_left_behind(total, failed, summary) == expected


def test_a_work_item_from_an_older_producer_with_an_attempt_field_still_opens() -> None:
    raw = {"stage": "sorting", "cohort": COHORT.model_dump(mode="json"), "item_key": "s1"}
    envelope = Envelope(type="WorkItem", source="sorter", payload={**raw, "attempt": 2})
    assert envelope.open(WorkItem).item_key == "s1"
