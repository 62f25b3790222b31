"""The Kafka broker every service uses, and the subscriber options that make delivery safe.

Delivery is at least once: offsets are committed only after a handler returned (never auto-commit
before processing). A handler that raises is nacked: the partition is rewound and the message comes
back; handlers therefore bound their own retries and dead-letter what keeps failing (`shared.stage`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.partitioner import murmur2
from faststream import AckPolicy
from faststream.kafka import KafkaBroker

from shared.settings import Settings, get_settings


def make_broker(settings: Settings | None = None, service: str = "cohortflow") -> KafkaBroker:
    settings = settings or get_settings()
    return KafkaBroker(
        settings.kafka_bootstrap.split(","),
        client_id=f"cohortflow-{service}",
        # a restarted broker costs time, never data: keep retrying the connection
        request_timeout_ms=30000,
        retry_backoff_ms=250,
        graceful_timeout=30.0,
        enable_idempotence=False,  # the local broker has no idempotent producer
        acks="all",
        # FastStream's records go through our one logging setup, not its own coloured format
        logger=logging.getLogger(f"cohortflow.{service}.broker"),
    )


@functools.lru_cache(maxsize=64)
def partition_key(partition: int, partitions: int) -> str:
    """A message key that the producer's partitioner (murmur2 of the key, as Kafka's Java client,
    `make_broker` keeps aiokafka's default) sends to `partition` of a topic with `partitions`
    partitions. For a plan that spreads its items over the partitions by its own measure of their
    work rather than by hash (`shared.stage.spread_items`). A topic with another partition count
    than `partitions` only gets a worse spread, never an error."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} of {partitions}")
    for salt in itertools.count():
        key = f"p{partition}.{salt}"
        if (murmur2(key.encode()) & 0x7FFFFFFF) % partitions == partition:
            return key
    raise AssertionError("unreachable")


def subscriber_kwargs(
    settings: Settings | None = None,
    group: str | None = None,
    *,
    from_beginning: bool = True,
    listener: ConsumerRebalanceListener | None = None,
) -> dict[str, Any]:
    """Options for `broker.subscriber(topic, **subscriber_kwargs(...))`.

    A group shares a topic's partitions among replicas; `group=None` gives every process all
    messages (for broadcast topics such as job control).
    """
    settings = settings or get_settings()
    options: dict[str, Any] = {
        "auto_offset_reset": "earliest" if from_beginning else "latest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "max_poll_records": 1,
    }
    if group is not None:
        options["group_id"] = group
        options["ack_policy"] = AckPolicy.NACK_ON_ERROR
        if listener is not None:
            options["listener"] = listener
    return options


async def ensure_topics(settings: Settings | None = None, timeout_s: float = 60.0) -> list[str]:
    """Create every topic of the registry that does not exist yet; returns the ones created.

    Production Kafka usually has topic auto-creation off; the migration Job and the local stack
    both call this so every topic exists with `kafka_partitions` partitions before consumers join.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from shared.topics import all_topics

    settings = settings or get_settings()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        request_timeout_ms=int(timeout_s * 1000),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in all_topics() if t not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        t,
                        num_partitions=settings.kafka_partitions,
                        replication_factor=settings.kafka_replication_factor,
                    )
                    for t in missing
                ]
            )
        return missing
    finally:
        await admin.close()
