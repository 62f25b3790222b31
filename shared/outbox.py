"""Transactional outbox: events written in the same transaction as the state they announce.

`enqueue` inserts into `<schema>.outbox` on the caller's connection, inside its transaction; the
`OutboxRelay` of the owning service publishes unsent rows in order and marks them sent. A crash
between "row written" and "event sent" loses nothing: the relay sends the row after restart, and
consumers are idempotent, so the rare duplicate is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker

from shared.events import Envelope, is_cloudevent_type
from shared.loops import BackgroundLoop
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

_BATCH = 200


def _channel(schema: str) -> str:
    return f"cohortflow_outbox_{schema}"


# the row and the relay's wake-up (delivered at commit) in one statement: one round trip an event
_ENQUEUE = (
    "INSERT INTO {schema}.outbox (id, topic, key, envelope)"
    " SELECT $1::uuid, $2::text, $3::text, $4::jsonb FROM (SELECT pg_notify($5, '')) AS wake"
    " ON CONFLICT (id) DO NOTHING"
)


async def enqueue(
    conn: asyncpg.Connection,
    schema: str,
    topic: str,
    envelope: Envelope,
    key: str | None = None,
) -> None:
    """Add an event to the schema's outbox; call inside the transaction of the state change."""
    await enqueue_many(conn, schema, [(topic, envelope, key)])


async def enqueue_many(
    conn: asyncpg.Connection,
    schema: str,
    events: Sequence[tuple[str, Envelope, str | None]],
) -> None:
    """Add (topic, envelope, key) events to the schema's outbox in this order, in one batch (a
    plan's work items); call inside the transaction of the state change."""
    channel = _channel(schema)
    rows = [
        (envelope.id, topic, key, envelope.model_dump(mode="json"), channel)
        for topic, envelope, key in events
    ]
    if len(rows) == 1:
        await conn.execute(_ENQUEUE.format(schema=schema), *rows[0])
    elif rows:
        await conn.executemany(_ENQUEUE.format(schema=schema), rows)


def kafka_message(envelope: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(value, headers) of an outbox row: our envelope as JSON, or for the events other systems
    read (a CloudEvents `type`, see `shared.events.cloudevent`) a CloudEvent in binary mode: its
    attributes as `ce_*` headers and its data as the value."""
    if not is_cloudevent_type(envelope.get("type", "")):
        return json.dumps(envelope).encode(), {
            "content-type": "application/json",
            "type": envelope.get("type", ""),
        }
    headers = {
        "ce_specversion": "1.0",
        "ce_id": str(envelope["id"]),
        "ce_source": envelope["source"],
        "ce_type": envelope["type"],
        "ce_time": str(envelope["time"]),
        "content-type": "application/json",
    }
    if envelope.get("subject"):
        headers["ce_subject"] = str(envelope["subject"])
    return json.dumps(envelope.get("payload", {})).encode(), headers


class OutboxRelay(BackgroundLoop):
    """Publishes a schema's unsent outbox rows, in order, at least once."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        broker: KafkaBroker,
        settings: Settings | None = None,
    ) -> None:
        super().__init__((settings or get_settings()).outbox_poll_interval_s)
        self.name = f"outbox-relay-{schema}"
        self._pool = pool
        self._schema = schema
        self._broker = broker
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        self._listener = await self._pool.acquire()
        await self._listener.add_listener(_channel(self._schema), self._on_notify)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(_channel(self._schema), self._on_notify)
            await self._pool.release(self._listener)
            self._listener = None

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def step(self) -> bool:
        return bool(await self.flush())

    async def idle(self) -> None:
        """Until a NOTIFY from `enqueue`, or the poll interval (a missed notification)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)

    async def flush(self) -> int:
        """Publish one batch of unsent rows; returns how many were sent."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT seq, topic, key, envelope FROM {self._schema}.outbox"
                " WHERE sent_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                _BATCH,
            )
            for row in rows:
                body, headers = kafka_message(row["envelope"])
                await self._broker.publish(
                    body,
                    topic=row["topic"],
                    key=row["key"].encode() if row["key"] else None,
                    headers=headers,
                )
            if rows:
                await conn.execute(
                    f"UPDATE {self._schema}.outbox SET sent_at = now() WHERE seq = ANY($1::bigint[])",
                    [r["seq"] for r in rows],
                )
            return len(rows)
