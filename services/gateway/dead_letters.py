"""Dead letters: what a stage service gave up on, kept, listed, replayed or discarded
(docs/adr-0022-dead-letters.md).

The gateway consumes every `cohortflow.dlq.<stage>` topic into `gateway.dead_letters` (one row per
`DeadLetter` envelope, so a redelivery changes nothing). A dead letter of a work item or of a plan
belongs to a stage job that has since ended with that work failed; replaying it starts a new run:
a job of the same stage with the same config and the same scope (the whole cohort, or the studies
of a new-study run), followed by the stages after it, so what is redone reaches the export. The old
job stays as it ended; the dead letter records the run that replayed it. A message that was never a
valid envelope or payload can only be discarded (nothing would read it differently a second time).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg

from services.gateway import repository as repo
from services.gateway.errors import Conflict, NotFound
from services.gateway.runs import RunStarted, start_replay
from shared import topics
from shared.events import DeadLetter, Envelope, StageRequested, WorkItem
from shared.settings import Settings
from shared.topics import Stage

log = logging.getLogger(__name__)


def stage_of_topic(dlq_topic: str) -> Stage | None:
    """`cohortflow.dlq.sorting` -> Stage.sorting; None for any other topic."""
    for stage in Stage:
        if topics.dlq(stage) == dlq_topic:
            return stage
    return None


def letter_kind(letter: DeadLetter, stage: Stage) -> str:
    """What was given up on, by the topic it came from and whether it still reads as its model:
    only a readable work item or request can be replayed."""
    try:
        if letter.topic == topics.items(stage):
            WorkItem.model_validate(letter.original)
            return "item"
        if letter.topic == topics.requested(stage):
            Envelope.model_validate(letter.original).open(StageRequested)
            return "plan"
    except ValueError:
        pass
    return "message"


def _item_key(letter: DeadLetter, kind: str) -> str | None:
    if kind == "item":
        return str(letter.original.get("item_key"))
    return None


async def record(pool: asyncpg.Pool, envelope: Envelope, dlq_topic: str) -> bool:
    """Keep one dead letter (once; False when it was already kept or is not for a stage)."""
    stage = stage_of_topic(dlq_topic)
    if stage is None:
        log.warning("dead letter on an unknown topic skipped", extra={"topic": dlq_topic})
        return False
    letter = envelope.open(DeadLetter)
    kind = letter_kind(letter, stage)
    async with pool.acquire() as conn:
        cohort_id = envelope.cohort_id
        if cohort_id is not None and await repo.get_cohort(conn, cohort_id) is None:
            cohort_id = None  # the cohort was deleted meanwhile: the letter is kept, unattached
        kept = await repo.insert_dead_letter(
            conn,
            id=envelope.id,
            stage=stage.value,
            kind=kind,
            topic=letter.topic,
            cohort_id=cohort_id,
            job_id=envelope.job_id,
            correlation_id=envelope.correlation_id,
            item_key=_item_key(letter, kind),
            error=letter.error[:4000],
            attempts=letter.attempts,
            original=letter.original,
            source=envelope.source,
            dead_at=envelope.time,
        )
    if kept:
        log.warning(
            "dead letter kept",
            extra={"id": str(envelope.id), "stage": stage.value, "kind": kind},
        )
    return bool(kept)


async def list_letters(
    pool: asyncpg.Pool,
    *,
    stage: Stage | None,
    cohort_id: uuid.UUID | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await repo.list_dead_letters(
            conn,
            stage=stage.value if stage else None,
            cohort_id=cohort_id,
            status=status,
            limit=limit,
            offset=offset,
        )


async def get_letter(
    conn: asyncpg.Connection, letter_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record:
    row = await repo.get_dead_letter(conn, letter_id, for_update=for_update)
    if row is None:
        raise NotFound(f"no dead letter with id {letter_id}")
    return row


def _open(letter: asyncpg.Record) -> None:
    if letter["status"] != "open":
        raise Conflict(f"dead letter {letter['id']} was already {letter['status']}")


def sent_config(letter: asyncpg.Record) -> dict[str, Any]:
    """The stage config the dead-lettered message carried (secrets sealed, as sent)."""
    original = letter["original"]
    if letter["kind"] == "item":
        return WorkItem.model_validate(original).config
    return Envelope.model_validate(original).open(StageRequested).config


async def replay(pool: asyncpg.Pool, settings: Settings, letter_id: uuid.UUID) -> RunStarted:
    """Redo the dead-lettered work: a new run from the letter's stage on (see the module doc);
    409 when the letter is not open, is not replayable, or its job has not ended yet."""
    async with pool.acquire() as conn, conn.transaction():
        letter = await get_letter(conn, letter_id)
        _open(letter)
        if letter["kind"] == "message" or letter["job_id"] is None:
            raise Conflict(
                "this dead letter is not a work item or a run's request (the message itself was"
                " not valid): nothing could read it differently again; discard it"
            )
        if letter["cohort_id"] is None:
            raise Conflict("the dead letter's cohort was deleted; discard it")
        job = await repo.get_job(conn, letter["job_id"])
        if job is None:
            raise Conflict(f"the dead letter's job {letter['job_id']} is no longer known")
        await repo.lock_cohort(conn, letter["cohort_id"])
        letter = await get_letter(conn, letter_id, for_update=True)
        _open(letter)
        job = await repo.get_job(conn, letter["job_id"], for_update=True)
        assert job is not None
        if job["status"] not in repo.TERMINAL:
            raise Conflict(
                f"job {job['id']} is still {job['status']}: replay once it has ended (its other"
                " items may yet succeed)"
            )
        started = await start_replay(conn, settings, job, sent_config(letter))
        await repo.resolve_dead_letter(conn, letter_id, "replayed", replay_run_id=started.run_id)
    return started


async def discard(pool: asyncpg.Pool, letter_id: uuid.UUID, note: str | None) -> asyncpg.Record:
    """Set the letter aside for good (409 when it was already replayed or discarded)."""
    async with pool.acquire() as conn, conn.transaction():
        letter = await get_letter(conn, letter_id, for_update=True)
        _open(letter)
        return await repo.resolve_dead_letter(conn, letter_id, "discarded", note=note)
