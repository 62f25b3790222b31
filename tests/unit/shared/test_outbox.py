"""The outbox: events enqueued in a transaction are published by the relay in order, once each;
a broker that is away leaves them unsent for the next try."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker

from shared import topics
from shared.events import CohortDeleted, Envelope
from shared.outbox import OutboxRelay, enqueue, enqueue_many
from shared.settings import Settings
from tests.unit.shared.fake_database import FakeDatabase

SCHEMA = "sorting"
TOPIC = topics.COHORTS_DELETED


async def _enqueue(db: FakeDatabase, cohorts: list[uuid.UUID]) -> None:
    async with db.pool().acquire() as conn:
        for cohort in cohorts:
            envelope = Envelope.wrap(CohortDeleted(cohort_id=cohort), source="gateway")
            await enqueue(conn, SCHEMA, TOPIC, envelope, key=str(cohort))


async def test_the_relay_publishes_unsent_events_in_order_and_only_once() -> None:
    db = FakeDatabase(SCHEMA)
    cohorts = [uuid.uuid4() for _ in range(3)]
    await _enqueue(db, cohorts)
    broker = KafkaBroker()
    received: list[Envelope] = []

    @broker.subscriber(TOPIC)
    async def on_deleted(envelope: Envelope) -> None:
        received.append(envelope)

    async with TestKafkaBroker(broker) as br:
        relay = OutboxRelay(db.pool(), SCHEMA, br, Settings())
        assert await relay.flush() == 3
        assert await relay.flush() == 0, "sent rows are not sent again"
        await _enqueue(db, [cohorts[0]])
        assert await relay.flush() == 1
    assert [e.open(CohortDeleted).cohort_id for e in received] == [*cohorts, cohorts[0]]


async def test_a_batch_is_enqueued_in_its_order_with_its_keys() -> None:
    db = FakeDatabase(SCHEMA)
    envelopes = [
        Envelope.wrap(CohortDeleted(cohort_id=uuid.uuid4()), source="gateway") for _ in range(3)
    ]
    async with db.pool().acquire() as conn:
        await enqueue_many(conn, SCHEMA, [])  # nothing to write: no statement
        await enqueue_many(
            conn, SCHEMA, [(TOPIC, e, str(i) if i else None) for i, e in enumerate(envelopes)]
        )
    assert [(t, k, e.id) for t, k, e in db.outbox] == [
        (TOPIC, None, envelopes[0].id),
        (TOPIC, "1", envelopes[1].id),
        (TOPIC, "2", envelopes[2].id),
    ]


class _AwayBroker:
    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker away")


async def test_rows_stay_unsent_while_the_broker_is_away() -> None:
    db = FakeDatabase(SCHEMA)
    await _enqueue(db, [uuid.uuid4()])
    relay = OutboxRelay(db.pool(), SCHEMA, _AwayBroker(), Settings())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await relay.flush()
    assert db.sent == set()
