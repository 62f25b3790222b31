"""Subscriber routing through FastStream's in-memory test broker: a valid envelope reaches its
handler, a message that is not one is dead-lettered (and acknowledged), a handler's own error
goes back to the broker so the message is redelivered."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import orjson
import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from pydantic import SecretStr

from shared import topics
from shared.events import (
    CohortDeleted,
    CohortRef,
    DeadLetter,
    Envelope,
    JobControl,
    StageRequested,
    StudyRetraction,
    WorkItem,
)
from shared.secrets import seal, unseal
from shared.service import Handler, envelope_handler, subscribe_stage
from shared.settings import Settings
from shared.topics import Stage

TOPIC = topics.COHORTS_DELETED
DLQ = topics.dlq(Stage.sorting)


def _broker(received: list[Envelope], letters: list[Envelope], fail: bool = False) -> KafkaBroker:
    broker = KafkaBroker()

    async def handle(envelope: Envelope) -> None:
        if fail:
            raise RuntimeError("database away")
        received.append(envelope)

    broker.subscriber(TOPIC)(envelope_handler(broker, "sorter", DLQ, handle))

    @broker.subscriber(DLQ)
    async def dead(letter: Envelope) -> None:  # FastStream decodes the JSON into the model
        letters.append(letter)

    return broker


async def test_a_valid_envelope_reaches_its_handler() -> None:
    received: list[Envelope] = []
    letters: list[Envelope] = []
    cohort = uuid.uuid4()
    envelope = Envelope.wrap(CohortDeleted(cohort_id=cohort), source="gateway", cohort_id=cohort)
    async with TestKafkaBroker(_broker(received, letters)) as br:
        await br.publish(envelope.model_dump_json().encode(), topic=TOPIC)
    assert [e.id for e in received] == [envelope.id]
    assert received[0].open(CohortDeleted).cohort_id == cohort
    assert letters == []


@pytest.mark.parametrize(
    "body",
    [b"not json at all", orjson.dumps({"type": "CohortDeleted"}), orjson.dumps([1, 2])],
    ids=["not-json", "no-source", "not-an-object"],
)
async def test_a_message_that_is_not_an_envelope_is_dead_lettered(body: bytes) -> None:
    received: list[Envelope] = []
    letters: list[Envelope] = []
    async with TestKafkaBroker(_broker(received, letters)) as br:
        await br.publish(body, topic=TOPIC)
    assert received == []
    (letter_env,) = letters
    assert letter_env.source == "sorter"
    letter = letter_env.open(DeadLetter)
    assert letter.error.startswith("not a valid envelope")
    assert letter.original == {"raw": body.decode()}


async def test_a_handler_error_is_raised_to_the_broker_for_redelivery() -> None:
    letters: list[Envelope] = []
    envelope = Envelope.wrap(CohortDeleted(cohort_id=uuid.uuid4()), source="gateway")
    async with TestKafkaBroker(_broker([], letters, fail=True)) as br:
        with pytest.raises(RuntimeError, match="database away"):
            await br.publish(envelope.model_dump_json().encode(), topic=TOPIC)
    assert letters == [], "a handler's failure is retried, never dead-lettered here"


class _Recorder:
    """Stands in for StageRuntime: records which handler got which envelope."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def _record(self, name: str) -> Callable[[Envelope], Awaitable[None]]:
        async def handle(envelope: Envelope) -> None:
            self.calls.append((name, envelope.type))

        return handle

    def __getattr__(self, name: str) -> Callable[[Envelope], Awaitable[None]]:
        return self._record(name)


class _Sorter:
    stage = Stage.sorting
    service = "sorter"
    schema = "sorting"


async def test_a_stage_service_routes_each_topic_to_its_runtime_handler() -> None:
    broker = KafkaBroker()
    runtime = _Recorder()
    subscribe_stage(broker, _Sorter(), runtime, Settings())  # type: ignore[arg-type]
    cohort = uuid.uuid4()
    ref = CohortRef(id=cohort, name="c", source_path="/d")
    sent = [
        (topics.requested(Stage.sorting), StageRequested(stage=Stage.sorting, cohort=ref)),
        (topics.items(Stage.sorting), WorkItem(stage=Stage.sorting, cohort=ref, item_key="s")),
        (topics.JOBS_CONTROL, JobControl(action="cancel")),
        (topics.COHORTS_DELETED, CohortDeleted(cohort_id=cohort)),
    ]
    async with TestKafkaBroker(broker) as br:
        for topic, payload in sent:
            envelope = Envelope.wrap(payload, source="gateway", job_id=uuid.uuid4())
            await br.publish(envelope.model_dump_json().encode(), topic=topic)
        await br.publish(b"garbage", topic=topics.items(Stage.sorting))
    assert runtime.calls == [
        ("handle_requested", "StageRequested"),
        ("handle_item", "WorkItem"),
        ("handle_control", "JobControl"),
        ("handle_cohort_deleted", "CohortDeleted"),
    ]


class _WithOwnTopic(_Sorter):
    """A plugin that handles a topic of its own besides the stage's (as the anonymizer does)."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    def subscriptions(self, pool: object) -> dict[str, Handler]:
        async def handle(envelope: Envelope) -> None:
            self.heard.append(envelope.type)

        return {topics.STUDY_RETRACTIONS: handle}


async def test_a_plugins_own_topic_reaches_its_handler_and_bad_messages_are_dead_lettered() -> None:
    broker = KafkaBroker()
    plugin = _WithOwnTopic()
    subscribe_stage(broker, plugin, _Recorder(), Settings())  # type: ignore[arg-type]
    letters: list[Envelope] = []

    @broker.subscriber(topics.dlq(Stage.sorting))
    async def dead(letter: Envelope) -> None:
        letters.append(letter)

    retraction = StudyRetraction(study_instance_uid="sealed", retracted=True, reason="r")
    envelope = Envelope.wrap(retraction, source="gateway", cohort_id=uuid.uuid4())
    async with TestKafkaBroker(broker) as br:
        await br.publish(envelope.model_dump_json().encode(), topic=topics.STUDY_RETRACTIONS)
        await br.publish(b"garbage", topic=topics.STUDY_RETRACTIONS)
    assert plugin.heard == ["StudyRetraction"]
    assert len(letters) == 1


async def _dead_letters_of(envelope: Envelope) -> list[Envelope]:
    """What a handler that expects `CohortDeleted` dead-letters when `envelope` arrives (publishing
    does not raise: the message is acknowledged, not redelivered)."""
    letters: list[Envelope] = []
    broker = KafkaBroker()

    async def handle(envelope: Envelope) -> None:
        envelope.open(CohortDeleted)

    broker.subscriber(TOPIC)(envelope_handler(broker, "sorter", DLQ, handle))

    @broker.subscriber(DLQ)
    async def dead(letter: Envelope) -> None:
        letters.append(letter)

    async with TestKafkaBroker(broker) as br:
        await br.publish(envelope.model_dump_json().encode(), topic=TOPIC)
    return letters


async def test_a_valid_envelope_whose_payload_is_not_is_dead_lettered_and_acknowledged() -> None:
    """Not redelivered: with one record per poll it would block its partition forever."""
    job = uuid.uuid4()
    envelope = Envelope(
        type="CohortDeleted", source="gateway", job_id=job, payload={"cohort_id": "nope"}
    )
    (letter_env,) = await _dead_letters_of(envelope)
    letter = letter_env.open(DeadLetter)
    assert letter.error.startswith("not a valid CohortDeleted")
    assert letter.original == {"cohort_id": "nope"} and letter.topic == TOPIC
    assert letter_env.job_id == job


async def test_an_envelope_of_another_type_than_expected_is_dead_lettered() -> None:
    envelope = Envelope.wrap(JobControl(action="cancel"), source="gateway")
    (letter_env,) = await _dead_letters_of(envelope)
    assert "expected a CohortDeleted event, got JobControl" in letter_env.open(DeadLetter).error


async def test_a_value_sealed_under_another_project_secret_is_dead_lettered() -> None:
    """A retraction sealed by another deployment's gateway can never be opened here: retried, it
    blocked its partition (and every later message on it) for good."""
    sender = Settings(project_secret=SecretStr("another deployment's secret"))
    here = Settings(project_secret=SecretStr("this deployment's secret"))
    sealed = seal("1.2.3.4", sender)
    letters: list[Envelope] = []
    broker = KafkaBroker()

    async def handle(envelope: Envelope) -> None:
        unseal(envelope.open(StudyRetraction).study_instance_uid, here)

    broker.subscriber(TOPIC)(envelope_handler(broker, "anonymizer", DLQ, handle))

    @broker.subscriber(DLQ)
    async def dead(letter: Envelope) -> None:
        letters.append(letter)

    retraction = StudyRetraction(study_instance_uid=sealed, retracted=True, reason="r")
    async with TestKafkaBroker(broker) as br:
        await br.publish(
            Envelope.wrap(retraction, source="gateway").model_dump_json().encode(), topic=TOPIC
        )
    (letter_env,) = letters
    assert "cannot be opened" in letter_env.open(DeadLetter).error


class _Exporter:
    stage = Stage.export
    service = "exporter"
    schema = "export"
    item_workers = 2


def test_a_plugin_with_item_workers_gets_that_many_item_consumers_and_only_there() -> None:
    broker = KafkaBroker()
    subscribe_stage(broker, _Exporter(), _Recorder(), Settings())  # type: ignore[arg-type]
    workers = {
        name: getattr(sub, "max_workers", 1)
        for sub in broker.subscribers
        for name in sub.topic_names  # type: ignore[attr-defined]
    }
    assert workers[topics.items(Stage.export)] == 2
    assert workers[topics.requested(Stage.export)] == 1
    assert workers[topics.JOBS_CONTROL] == 1


def test_a_stage_service_is_three_consumers_whatever_its_topics() -> None:
    """Items, the rare topics (requests, deletions, the plugin's own) in one group member, and
    job control heard by every replica and polled less often (ADR 0031)."""
    broker = KafkaBroker()
    settings = Settings()
    subscribe_stage(broker, _WithOwnTopic(), _Recorder(), settings)  # type: ignore[arg-type]
    consumers = {
        frozenset(sub.topic_names): sub  # type: ignore[attr-defined]
        for sub in broker.subscribers
    }
    assert set(consumers) == {
        frozenset({topics.items(Stage.sorting)}),
        frozenset(
            {topics.requested(Stage.sorting), topics.COHORTS_DELETED, topics.STUDY_RETRACTIONS}
        ),
        frozenset({topics.JOBS_CONTROL}),
    }
    control = consumers[frozenset({topics.JOBS_CONTROL})]
    assert control.group_id is None  # type: ignore[attr-defined]
    waits = {topic: sub._connection_args["fetch_max_wait_ms"] for topic, sub in consumers.items()}  # type: ignore[attr-defined]
    assert waits.pop(frozenset({topics.JOBS_CONTROL})) == settings.kafka_control_fetch_max_wait_ms
    assert set(waits.values()) == {settings.kafka_fetch_max_wait_ms}
