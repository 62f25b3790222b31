"""`shared.broker.committed`: a message's own partition is committed after its handler returned,
and a handler that raises rewinds it instead (ADR 0031)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.broker import by_topic, committed


class _Message:
    """What `committed` reads of FastStream's `KafkaMessage`."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str = "t", partition: int = 2) -> None:
        self.raw_message = ConsumerRecord(topic, partition, 41, 0, 0, None, b"v", None, 0, 1, [])
        self.consumer = consumer
        self.nacked = False

    async def nack(self) -> None:
        self.nacked = True


@pytest.fixture
async def consumer(monkeypatch: pytest.MonkeyPatch) -> Any:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", group_id="g")
    commits: list[dict[TopicPartition, int] | None] = []

    async def commit(offsets: dict[TopicPartition, int] | None = None) -> None:
        commits.append(offsets)

    monkeypatch.setattr(consumer, "commit", commit)
    consumer.commits = commits
    return consumer


async def test_a_handled_message_commits_its_own_partition_only(consumer: Any) -> None:
    handled: list[str] = []

    async def handle(message: Any) -> None:
        handled.append(message.raw_message.topic)

    message = _Message(consumer)
    await committed(handle)(message)  # type: ignore[arg-type]
    assert handled == ["t"]
    assert consumer.commits == [{TopicPartition("t", 2): 42}]  # the next offset, never None
    assert not message.nacked


async def test_a_handler_that_raises_rewinds_and_commits_nothing(consumer: Any) -> None:
    async def handle(message: Any) -> None:
        raise RuntimeError("database away")

    message = _Message(consumer)
    with pytest.raises(RuntimeError):
        await committed(handle)(message)  # type: ignore[arg-type]
    assert message.nacked
    assert consumer.commits == []


async def test_messages_go_to_their_topics_handler_and_an_unknown_topic_is_no_silent_ack(
    consumer: Any,
) -> None:
    heard: list[str] = []

    async def a(message: Any) -> None:
        heard.append("a")

    async def b(message: Any) -> None:
        heard.append("b")

    route = committed(by_topic({"ta": a, "tb": b}))
    await route(_Message(consumer, "tb"))  # type: ignore[arg-type]
    await route(_Message(consumer, "ta"))  # type: ignore[arg-type]
    assert heard == ["b", "a"]
    stray = _Message(consumer, "tc")
    with pytest.raises(LookupError):
        await route(stray)  # type: ignore[arg-type]
    assert stray.nacked
    assert consumer.commits == [{TopicPartition("tb", 2): 42}, {TopicPartition("ta", 2): 42}]
