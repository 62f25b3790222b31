"""Dead letters: what the stage services gave up on; list, show, replay, discard
(docs/adr-0022-dead-letters.md)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field

from services.gateway import dead_letters
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import MAX_OFFSET, JobOut, RunOut
from shared.topics import Stage

router = APIRouter(prefix="/dead-letters", tags=["dead letters"])

DeadLetterStatus = Literal["open", "replayed", "discarded"]


class DeadLetterOut(BaseModel):
    id: uuid.UUID
    stage: Stage
    kind: Literal["item", "plan", "message"] = Field(
        description="item: a work item; plan: a run's request whose plan could not be made or"
        " stored; message: a message that was no valid envelope or payload (discard only)"
    )
    topic: str = Field(description="the topic the message given up on was consumed from")
    cohort_id: uuid.UUID | None
    job_id: uuid.UUID | None
    correlation_id: uuid.UUID | None = Field(description="the pipeline run it belonged to")
    item_key: str | None
    error: str
    attempts: int
    source: str
    status: DeadLetterStatus
    replay_run_id: uuid.UUID | None
    note: str | None
    dead_at: datetime
    received_at: datetime
    resolved_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> DeadLetterOut:
        return cls(**{k: row[k] for k in cls.model_fields})


class DeadLetterDetail(DeadLetterOut):
    original: dict[str, Any] = Field(description="the payload given up on, as it was sent")


class DiscardIn(BaseModel):
    note: str | None = Field(default=None, max_length=2000, description="why it is set aside")


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
