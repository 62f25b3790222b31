"""Requests held until a run's jobs change: what a client following a run asks instead of polling.

Every change to a job row notifies `cohortflow_jobs` with its run's id (a trigger,
`migrations/010_job_notify.sql`), sent by Postgres at commit, so a change made by any gateway
replica wakes the requests waiting in every replica. `JobWatch` keeps one listening connection per
process; `held_until_changed` answers when the answer differs from the one the client has (its
ETag), or when the wait is over. A notification lost (the listening connection gone) costs at most
`RECHECK_S`: the answer is read again that often whatever is heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "cohortflow_jobs"
MAX_WAIT_S = 10.0  # held at most this long: a gateway stopping waits for held requests
RECHECK_S = 1.0

T = TypeVar("T")


class JobWatch:
    """Wakes the waiters of a run (or of every run) when a job of it changed."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._listener: asyncpg.Connection | None = None
        self._waiters: dict[str | None, set[asyncio.Event]] = {}

    async def start(self) -> None:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await self._listen()

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.remove_listener(CHANNEL, self._notified)
            with contextlib.suppress(Exception):
                await self._pool.release(listener)

    async def _listen(self) -> None:
        listener = await self._pool.acquire()
        await listener.add_listener(CHANNEL, self._notified)
        self._listener = listener

    async def ensure_listening(self) -> None:
        """Listen again when the connection was lost (Postgres restarted); never raises."""
        if self._listener is not None and not self._listener.is_closed():
            return
        await self.stop()
        try:
            await self._listen()
        except Exception:  # the database away, or the pool closing with the gateway
            log.warning(
                "cannot listen for job changes; held requests re-read every %s s", RECHECK_S
            )

    def _notified(self, _conn: object, _pid: int, _channel: str, run_id: str) -> None:
        for key in (run_id, None):
            for event in self._waiters.get(key, ()):
                event.set()

    @contextlib.contextmanager
    def changes(self, run_id: uuid.UUID | None) -> Iterator[asyncio.Event]:
        """An event set when a job of `run_id` (None: of any run) changed, while inside."""
        key = str(run_id) if run_id is not None else None
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiters.get(key, set())
            waiting.discard(event)
            if not waiting:
                self._waiters.pop(key, None)


def etag_of(document: Any) -> str:
    """A strong ETag of a JSON-able answer."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def wait_preference(prefer: str | None) -> float:
    """Seconds asked for by `Prefer: wait=N` (RFC 7240), at most `MAX_WAIT_S`; 0 when absent or
    not a number."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            return min(max(seconds, 0.0), MAX_WAIT_S) if seconds == seconds else 0.0
    return 0.0


async def held_until_changed(
    watch: JobWatch | None,
    run_id: uuid.UUID | None,
    read: Callable[[], Awaitable[T]],
    etag: Callable[[T], str],
    known: str | None,
    wait_s: float,
) -> tuple[T, str]:
    """(answer, its ETag): read at once, and again on each change of the run's jobs while the
    answer's ETag is still `known`, until `wait_s` passed. Holds no database connection while
    waiting (`read` takes one each time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    if watch is None or known is None or wait_s <= 0:
        answer = await read()
        return answer, etag(answer)
    await watch.ensure_listening()
    with watch.changes(run_id) as changed:
        while True:
            changed.clear()  # before reading: a change committed after the read still wakes us
            answer = await read()
            tag = etag(answer)
            left = deadline - loop.time()
            if tag != known or left <= 0:
                return answer, tag
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(left, RECHECK_S))
