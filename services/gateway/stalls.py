"""Jobs nobody works on: marked stalled in their status reason (ADR 0019).

Stage services report on their open runs while they work (progress events, and heartbeats while an
item or a plan is in hand, however long it takes). A job whose stage should be at work on it and
from which nothing was heard for `stall_after_s` gets `status_reason` "stalled: ..."; the next
report lifts it (`repository.heard_from`). The status itself does not change: the work is still
owed, and it goes on when a service takes it up again (the local stack's supervisor restarts a
dead one; a crash-looping one is what the stall shows).
"""

from __future__ import annotations

import logging

import asyncpg

from services.gateway import repository as repo
from shared.loops import BackgroundLoop
from shared.settings import Settings

log = logging.getLogger(__name__)


def stalled_reason(stage: str, after_s: float) -> str:
    return (
        f"{repo.STALLED}no word from the {stage} service for over {after_s:g} s: it is down, or "
        "crashes on this job (its log says which); the job goes on when the service is back"
    )


async def mark_stalled_jobs(pool: asyncpg.Pool, after_s: float) -> list[str]:
    """Mark every job that qualifies; returns their ids. Each in its own transaction, the cohort
    locked first (the lock order of `repository`)."""
    marked = []
    async with pool.acquire() as conn:
        for job in await repo.stall_candidates(conn, after_s):
            async with conn.transaction():
                await repo.lock_cohort(conn, job["cohort_id"])
                reason = stalled_reason(job["stage"], after_s)
                if await repo.mark_stalled(conn, job["id"], after_s, reason):
                    marked.append(str(job["id"]))
    if marked:
        log.warning("jobs stalled", extra={"job_ids": marked, "after_s": after_s})
    return marked


class StallWatch(BackgroundLoop):
    """Looks for stalled jobs every quarter of `stall_after_s` (at most every 10 s)."""

    name = "stall-watch"

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        super().__init__(min(settings.stall_after_s / 4, 10.0))
        self._pool = pool
        self._after_s = settings.stall_after_s

    async def step(self) -> bool:
        await mark_stalled_jobs(self._pool, self._after_s)
        return False
