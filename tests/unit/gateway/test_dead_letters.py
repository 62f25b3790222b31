"""What kind of dead letter the gateway keeps, by the topic and whether it still reads as its model
(only a readable work item or run request can be replayed), and the config a replay sends."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.gateway.dead_letters import letter_kind, sent_config, stage_of_topic
from shared import topics
from shared.events import CohortRef, DeadLetter, Envelope, StageRequested, WorkItem
from shared.topics import Stage

COHORT = CohortRef(id=uuid.uuid4(), name="c", source_path="/data/c")


def _letter(topic: str, original: dict[str, Any]) -> DeadLetter:
    return DeadLetter(topic=topic, error="boom", attempts=3, original=original)


def test_the_stage_comes_from_the_dead_letter_topic() -> None:
    assert stage_of_topic(topics.dlq(Stage.export)) is Stage.export
    assert stage_of_topic("cohortflow.export.items") is None


def test_a_work_item_letter_is_an_item_and_replays_with_its_config() -> None:
    item = WorkItem(stage=Stage.sorting, cohort=COHORT, item_key="s1", config={"profile": "x"})
    letter = _letter(topics.items(Stage.sorting), item.model_dump(mode="json"))
    assert letter_kind(letter, Stage.sorting) == "item"
    row = {"kind": "item", "original": letter.original}
    assert sent_config(row) == {"profile": "x"}


def test_a_run_request_letter_is_a_plan_and_replays_with_its_config() -> None:
    request = StageRequested(stage=Stage.export, cohort=COHORT, config={"outputModes": ["nii"]})
    original = Envelope.wrap(request, source="gateway").model_dump(mode="json")
    letter = _letter(topics.requested(Stage.export), original)
    assert letter_kind(letter, Stage.export) == "plan"
    row = {"kind": "plan", "original": original}
    assert sent_config(row) == {"outputModes": ["nii"]}


@pytest.mark.parametrize(
    ("topic", "original"),
    [
        (topics.items(Stage.sorting), {"raw": "not an envelope"}),
        (topics.items(Stage.sorting), {"item_key": "s1", "cohort": "not a cohort"}),
        (topics.requested(Stage.sorting), {"type": "StageRequested", "payload": {}}),
        (topics.JOBS_CONTROL, {"action": "cancel"}),
    ],
    ids=["undecodable", "invalid-item", "invalid-request", "other-topic"],
)
def test_anything_unreadable_is_a_message_letter(topic: str, original: dict[str, Any]) -> None:
    assert letter_kind(_letter(topic, original), Stage.sorting) == "message"
