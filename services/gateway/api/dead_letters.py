"""Dead letters: what the stage services gave up on; list, show, replay, discard
(docs/adr-0022-dead-letters.md)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, status

from services.gateway import dead_letters
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import (
    MAX_OFFSET,
    DeadLetterDetail,
    DeadLetterOut,
    DeadLetterStatus,
    DiscardIn,
    JobOut,
    RunOut,
)
from shared.topics import Stage

router = APIRouter(prefix="/dead-letters", tags=["dead letters"])


@router.get("", response_model=list[DeadLetterOut])
async def list_dead_letters(
    ctx: Context,
    stage: Stage | None = None,
    cohort_id: uuid.UUID | None = None,
    status: DeadLetterStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[DeadLetterOut]:
    """Newest first."""
    rows = await dead_letters.list_letters(
        ctx.pool, stage=stage, cohort_id=cohort_id, status=status, limit=limit, offset=offset
    )
    return [DeadLetterOut.from_row(r) for r in rows]


@router.get("/{letter_id}", response_model=DeadLetterDetail)
async def get_dead_letter(letter_id: uuid.UUID, ctx: Context) -> DeadLetterDetail:
    async with ctx.pool.acquire() as conn:
        row = await dead_letters.get_letter(conn, letter_id)
    return DeadLetterDetail(**{k: row[k] for k in DeadLetterDetail.model_fields})


@router.post("/{letter_id}/replay", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
async def replay_dead_letter(letter_id: uuid.UUID, ctx: Publishing) -> RunOut:
    """Redo the work: a new run of the letter's stage (same config, same scope as its job's run)
    and the stages after it. 409 when the letter is not open, not replayable, or its job has not
    ended."""
    started = await dead_letters.replay(ctx.pool, ctx.settings, letter_id)
    return RunOut(
        run_id=started.run_id,
        cohort_id=started.jobs[0]["cohort_id"],
        jobs=[JobOut.from_row(j) for j in started.jobs],
    )


@router.post("/{letter_id}/discard", response_model=DeadLetterOut)
async def discard_dead_letter(
    letter_id: uuid.UUID, ctx: Context, body: DiscardIn | None = None
) -> DeadLetterOut:
    """Set the letter aside for good, with an optional note (409 when no longer open)."""
    row = await dead_letters.discard(ctx.pool, letter_id, body.note if body else None)
    return DeadLetterOut.from_row(row)
