"""Background loops of a service: one step again and again until stopped, a failing step logged
and retried after a pause, never the end of the loop (the database or broker away for a while)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Runs `step()` until `stop()`: at once again when it did some work, else after `idle()`
    (by default `interval_s` of sleep)."""

    name = "background loop"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> bool:
        """One pass; True when it did something (the next pass comes at once)."""
        raise NotImplementedError

    async def idle(self) -> None:
        await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database or broker away: try again after a pause
                log.warning("%s failed; retrying", self.name, exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if not busy:
                await self.idle()
