"""Requests held until a run's jobs change: answered at the change, not at the end of the wait."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from services.gateway.job_watch import (
    CHANNEL,
    MAX_WAIT_S,
    JobWatch,
    etag_of,
    held_until_changed,
    wait_preference,
)

RUN = uuid.uuid4()


class FakeListener:
    def __init__(self) -> None:
        self.callbacks: dict[str, Any] = {}
        self.closed = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.callbacks[channel] = callback

    async def remove_listener(self, channel: str, callback: Any) -> None:
        self.callbacks.pop(channel, None)

    def is_closed(self) -> bool:
        return self.closed

    def notify(self, run_id: uuid.UUID) -> None:
        self.callbacks[CHANNEL](self, 1, CHANNEL, str(run_id))


class FakePool:
    def __init__(self) -> None:
        self.listener = FakeListener()
        self.acquired = 0

    async def acquire(self) -> FakeListener:
        self.acquired += 1
        if self.listener.closed:  # a new connection after the old one was lost
            self.listener = FakeListener()
        return self.listener

    async def release(self, _conn: FakeListener) -> None:
        pass


@pytest.mark.parametrize(
    ("prefer", "seconds"),
    [
        (None, 0.0),
        ("wait=5", 5.0),
        ("respond-async, wait=2.5", 2.5),
        ("wait=3600", MAX_WAIT_S),
        ("wait=-1", 0.0),
        ("wait=soon", 0.0),
        ("wait=nan", 0.0),
        ("return=minimal", 0.0),
    ],
)
def test_the_wait_asked_for_is_bounded(prefer: str | None, seconds: float) -> None:
    assert wait_preference(prefer) == seconds


def test_the_etag_follows_the_content() -> None:
    assert etag_of([{"a": 1, "b": 2}]) == etag_of([{"b": 2, "a": 1}])
    assert etag_of([{"a": 1}]) != etag_of([{"a": 2}])


async def _held(watch: JobWatch, states: list[str], known: str | None, wait_s: float) -> Any:
    async def read() -> str:
        return states[-1]

    return await held_until_changed(watch, RUN, read, etag_of, known, wait_s)


async def test_a_held_request_answers_at_the_change() -> None:
    pool = FakePool()
    watch = JobWatch(pool)
    await watch.start()
    states = ["running"]
    held = asyncio.create_task(_held(watch, states, etag_of("running"), 5.0))
    await asyncio.sleep(0.05)
    assert not held.done()
    started = time.monotonic()
    states.append("completed")
    pool.listener.notify(RUN)
    answer, tag = await asyncio.wait_for(held, 1.0)
    assert answer == "completed" and tag == etag_of("completed")
    assert time.monotonic() - started < 0.5
    await watch.stop()


async def test_a_change_of_another_run_does_not_answer() -> None:
    pool = FakePool()
    watch = JobWatch(pool)
    await watch.start()
    held = asyncio.create_task(_held(watch, ["running"], etag_of("running"), 0.3))
    await asyncio.sleep(0.05)
    pool.listener.notify(uuid.uuid4())
    answer, tag = await held  # the wait ran out: the same answer (the route's 304)
    assert answer == "running" and tag == etag_of("running")
    await watch.stop()


async def test_without_an_etag_or_a_wait_the_answer_comes_at_once() -> None:
    watch = JobWatch(FakePool())
    started = time.monotonic()
    await _held(watch, ["running"], None, 5.0)
    await _held(watch, ["running"], etag_of("running"), 0.0)
    await _held(None, ["running"], etag_of("running"), 5.0)  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5


async def test_a_lost_listening_connection_is_replaced_by_the_next_held_request() -> None:
    pool = FakePool()
    watch = JobWatch(pool)
    await watch.start()
    pool.listener.closed = True  # Postgres restarted
    states = ["running"]
    held = asyncio.create_task(_held(watch, states, etag_of("running"), 5.0))
    await asyncio.sleep(0.05)
    assert pool.acquired == 2 and not pool.listener.closed
    states.append("completed")
    pool.listener.notify(RUN)
    answer, _ = await asyncio.wait_for(held, 0.5)
    assert answer == "completed"
    await watch.stop()
