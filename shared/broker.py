"""The Kafka broker every service uses, and the subscriptions that make delivery safe.

Delivery is at least once: a message's offset is committed only after its handler returned (never
auto-commit before processing), and only its own partition's (ADR 0031). A handler that raises is
nacked: the partition is rewound and the message comes back; handlers therefore bound their own
retries and dead-letter what keeps failing (`shared.stage`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.partitioner import murmur2
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

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


MessageHandler = Callable[[KafkaMessage], Awaitable[None]]


def subscriber_kwargs(
    settings: Settings | None = None,
    group: str | None = None,
    *,
    from_beginning: bool = True,
    listener: ConsumerRebalanceListener | None = None,
    fetch_max_wait_ms: int | None = None,
) -> dict[str, Any]:
    """Options for `broker.subscriber(topic, **subscriber_kwargs(...))`; `subscribe` is the way
    to use them, since a group's handler must commit (`committed`).

    A group shares a topic's partitions among replicas; `group=None` gives every process all
    messages (for broadcast topics such as job control). `fetch_max_wait_ms`: how long an idle
    fetch waits (default `kafka_fetch_max_wait_ms`), i.e. how late a message can be seen; a topic
    off the hand-over path polls less often (ADR 0031).
    """
    settings = settings or get_settings()
    options: dict[str, Any] = {
        "auto_offset_reset": "earliest" if from_beginning else "latest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "fetch_max_wait_ms": fetch_max_wait_ms or settings.kafka_fetch_max_wait_ms,
        "max_poll_records": 1,
    }
    if group is not None:
        options["group_id"] = group
        options["ack_policy"] = AckPolicy.MANUAL  # `committed` acks and nacks
        if listener is not None:
            options["listener"] = listener
    return options


def committed(handle: MessageHandler) -> MessageHandler:
    """`handle`, then the commit of its message's partition alone; a handler that raises rewinds
    the partition to its message, which comes back.

    FastStream's own ack commits the position of every partition the consumer holds, and the local
    broker writes one object per partition per commit: 36 for each event the gateway read, 4 for
    each item (ADR 0031). Committing one partition is what Kafka commits either way.
    """

    async def consume(message: KafkaMessage) -> None:
        try:
            await handle(message)
        except BaseException:
            await message.nack()
            raise
        record, consumer = message.raw_message, message.consumer
        if isinstance(consumer, AIOKafkaConsumer) and isinstance(record, ConsumerRecord):
            next_offset = {TopicPartition(record.topic, record.partition): record.offset + 1}
            await consumer.commit(next_offset)
        else:  # FastStream's in-memory test consumer: nothing to commit but the message
            await message.ack()

    return consume


def subscribe(
    broker: KafkaBroker,
    topics: Sequence[str],
    handle: MessageHandler,
    settings: Settings,
    group: str | None,
    *,
    fetch_max_wait_ms: int | None = None,
    **extra: Any,
) -> None:
    """Subscribe `handle` to `topics` as one consumer (one group member, however many topics:
    `by_topic` dispatches). In `group`: from the earliest uncommitted message, each committed after
    its handler returned; without one (broadcast, e.g. job control) every process hears every
    message from now on. `extra`: more subscriber options (`max_workers`)."""
    options = subscriber_kwargs(
        settings, group, from_beginning=group is not None, fetch_max_wait_ms=fetch_max_wait_ms
    )
    broker.subscriber(*topics, **options, **extra)(committed(handle) if group else handle)


def by_topic(handlers: Mapping[str, MessageHandler]) -> MessageHandler:
    """One handler for a subscriber of several topics, passing each message to its topic's.

    Each subscriber in a group is a group member: it heartbeats, and every heartbeat costs the
    broker (the local one writes the group's state to S3 each time). Topics with little traffic
    share one member this way (ADR 0031). Messages are still handled one at a time and committed
    after their handler returned, per partition as before.
    """
    known = dict(handlers)

    async def consume(message: KafkaMessage) -> None:
        topic = str(getattr(message.raw_message, "topic", ""))
        handle = known.get(topic)
        if handle is None:  # the subscriber names exactly these topics; never a silent ack
            raise LookupError(f"no handler for topic {topic!r}")
        await handle(message)

    return consume


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
