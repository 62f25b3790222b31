"""Waiting for the system under test: events travel through the broker and services work
asynchronously, so a test polls until what it expects holds, or fails saying what it last saw.

Async tests (httpx.AsyncClient, asyncpg) use `eventually` and `wait_job`; tests with a blocking
httpx.Client use `eventually_blocking` and `wait_job_blocking`. One deadline rule for all four.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# a job in one of these states will not change any more
TERMINAL = ("completed", "failed", "cancelled")


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    timeout: float = 20.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Await `probe` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s (last: {value!r})")
        await asyncio.sleep(interval)


def eventually_blocking(
    probe: Callable[[], T | None],
    timeout: float = 20.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Call `probe` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s (last: {value!r})")
        time.sleep(interval)


def _job_reached(job: dict[str, Any], until: tuple[str, ...]) -> dict[str, Any] | None:
    return job if job["status"] in until else None


async def wait_job(
    api: httpx.AsyncClient,
    job_id: str,
    timeout: float = 300.0,
    until: tuple[str, ...] = TERMINAL,
) -> dict[str, Any]:
    """The gateway's view of a job once its status is in `until` (by default: it ended)."""
    seen: dict[str, Any] = {}

    async def probe() -> dict[str, Any] | None:
        seen.update((await api.get(f"/api/jobs/{job_id}")).json())
        return _job_reached(seen, until)

    try:
        return dict(await eventually(probe, timeout, 0.5))
    except AssertionError:
        raise AssertionError(
            f"job {job_id} still {seen.get('status')} after {timeout:.0f} s: {seen}"
        ) from None


def wait_job_blocking(
    api: httpx.Client,
    job_id: str,
    timeout: float = 300.0,
    until: tuple[str, ...] = TERMINAL,
) -> dict[str, Any]:
    """`wait_job` for a blocking client."""
    seen: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        seen.update(api.get(f"/api/jobs/{job_id}").json())
        return _job_reached(seen, until)

    try:
        return dict(eventually_blocking(probe, timeout, 0.5))
    except AssertionError:
        raise AssertionError(
            f"job {job_id} still {seen.get('status')} after {timeout:.0f} s: {seen}"
        ) from None
