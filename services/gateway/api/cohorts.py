"""Cohorts, and starting stage runs and pipelines on them."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
from fastapi import APIRouter, Query, Response, status

from services.gateway import SCHEMA, runs, thumbnails
from services.gateway import repository as repo
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import (
    CohortCreate,
    CohortOut,
    CohortPatch,
    CohortStatusName,
    JobOut,
    PipelineRequest,
    RunOut,
    StageRunRequest,
)
from services.gateway.errors import Conflict, Invalid, NotFound, Unavailable
from services.gateway.runs import SOURCE
from shared import topics
from shared.events import CohortDeleted, Envelope
from shared.outbox import enqueue
from shared.settings import Settings
from shared.sources import SourceError, check_location
from shared.topics import Stage

router = APIRouter(prefix="/cohorts", tags=["cohorts"])
log = logging.getLogger(__name__)


def _source_path(value: str, settings: Settings) -> str:
    try:
        return check_location(value, settings)
    except (SourceError, ValueError, OSError) as exc:  # NUL bytes, names too long, ...
        message = str(exc)  # most already name the field: said once, not twice
        raise Invalid(
            message if message.startswith("source_path") else f"source_path: {message}"
        ) from exc


async def _cohort_out(conn: asyncpg.Connection, cohort: asyncpg.Record) -> CohortOut:
    return CohortOut.from_rows(cohort, await repo.latest_stage_jobs(conn, cohort["id"]))


def _name_taken(name: str) -> Conflict:
    return Conflict(f"a cohort named {name!r} already exists (names are unique, ignoring case)")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=CohortOut)
async def create_cohort(body: CohortCreate, ctx: Context) -> CohortOut:
    """Create a cohort; with `pipeline`, also start its pipeline in the same transaction (so a
    refused config, 422, or a busy broker, 503, leaves no cohort behind)."""
    values = body.model_dump(exclude={"pipeline"})
    values["source_path"] = _source_path(body.source_path, ctx.settings)
    if body.pipeline is not None and not await ctx.broker.reachable():
        raise Unavailable("the message broker is unreachable; retry later")
    async with ctx.pool.acquire() as conn, conn.transaction():
        try:
            cohort = await repo.insert_cohort(conn, values)
        except asyncpg.UniqueViolationError as exc:
            raise _name_taken(body.name) from exc
        if body.pipeline is not None:
            await runs.start_pipeline_locked(conn, ctx.settings, cohort, body.pipeline.configs())
            cohort = await _existing(conn, cohort["id"])
        return await _cohort_out(conn, cohort)


@router.get("", response_model=list[CohortOut])
async def list_cohorts(ctx: Context, status: CohortStatusName | None = None) -> list[CohortOut]:
    async with ctx.pool.acquire() as conn:
        cohorts = await repo.list_cohorts(conn, status)
        jobs = await repo.latest_stage_jobs_of(conn, [c["id"] for c in cohorts])
    return [CohortOut.from_rows(c, jobs.get(c["id"], {})) for c in cohorts]


async def _existing(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> asyncpg.Record:
    cohort = await repo.get_cohort(conn, cohort_id)
    if cohort is None:
        raise NotFound(f"no cohort with id {cohort_id}")
    return cohort


@router.get("/{cohort_id}", response_model=CohortOut)
async def get_cohort(cohort_id: uuid.UUID, ctx: Context) -> CohortOut:
    async with ctx.pool.acquire() as conn:
        return await _cohort_out(conn, await _existing(conn, cohort_id))


def _check_anonymization_change(enabled: bool, stages_run: set[Stage]) -> None:
    """Anonymization is one-way (docs/adr-0017-sources.md): a cohort that has had an anonymization
    job keeps de-identified data only, and one whose catalog was extracted from identified data
    cannot start mixing pseudonyms into it. Raises `Conflict` saying why; a new cohort is the way."""
    if enabled and Stage.anonymization in stages_run:
        raise Conflict(
            "anonymization cannot be turned off: this cohort has been anonymized, so its catalog"
            " and zones hold de-identified data only; create a new cohort (anonymization_enabled"
            " false) to work with the identified data"
        )
    if not enabled and Stage.extraction in stages_run:
        raise Conflict(
            "anonymization cannot be turned on: this cohort's catalog was extracted from"
            " identified data; create a new cohort with anonymization_enabled true instead"
        )


@router.patch("/{cohort_id}", response_model=CohortOut)
async def update_cohort(cohort_id: uuid.UUID, body: CohortPatch, ctx: Context) -> CohortOut:
    values: dict[str, Any] = body.model_dump(exclude_unset=True)
    for field, value in values.items():
        if value is None:
            raise Invalid(f"{field} may not be null; leave it out to keep its value")
    if "source_path" in values:
        values["source_path"] = _source_path(values["source_path"], ctx.settings)
    async with ctx.pool.acquire() as conn, conn.transaction():
        cohort = await repo.lock_cohort(conn, cohort_id)
        if cohort is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        changing = [
            f
            for f in ("source_path", "anonymization_enabled")
            if f in values and values[f] != cohort[f]
        ]
        if changing and cohort["status"] == "in_progress":
            raise Conflict(
                f"cannot change {' and '.join(changing)} while the cohort is in progress;"
                " wait for its jobs to end or cancel them"
            )
        if "anonymization_enabled" in changing:
            _check_anonymization_change(
                cohort["anonymization_enabled"], await repo.stages_ever_run(conn, cohort_id)
            )
        try:
            cohort = await repo.update_cohort(conn, cohort_id, values)
        except asyncpg.UniqueViolationError as exc:
            raise _name_taken(values["name"]) from exc
        if "anonymization_enabled" in changing:
            await repo.refresh_cohort_status(conn, cohort_id)
            cohort = await _existing(conn, cohort_id)
        return await _cohort_out(conn, cohort)


@router.delete("/{cohort_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_cohort(cohort_id: uuid.UUID, ctx: Publishing) -> Response:
    """Delete a cohort and, through a `CohortDeleted` event, what every stage holds of it: catalog,
    classifications, export records, and the raw, de-identified and export zones' objects. Audit
    exports (the record of what was released) and export destinations outside the bucket stay.
    409 while the cohort is in progress."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        cohort = await repo.lock_cohort(conn, cohort_id)
        if cohort is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        if cohort["status"] == "in_progress":
            raise Conflict("the cohort is in progress; cancel its jobs before deleting it")
        await repo.delete_cohort(conn, cohort_id)
        # the stage services drop their rows and objects of it (catalog, classifications, raw,
        # de-identified and export zones); audit exports and export destinations stay
        deleted = Envelope.wrap(
            CohortDeleted(cohort_id=cohort_id), source=SOURCE, cohort_id=cohort_id
        )
        await enqueue(conn, SCHEMA, topics.COHORTS_DELETED, deleted, key=str(cohort_id))
    # the gateway's own objects of it, the cached stack pictures: best effort, the cohort is gone
    # already (a picture left behind is never served: the route asks for the cohort first)
    try:
        await asyncio.to_thread(ctx.store.delete_prefix, thumbnails.cohort_prefix(cohort_id))
    except Exception as exc:
        log.warning(
            "stack pictures not removed",
            extra={"cohort_id": str(cohort_id), "error": str(exc)[:200]},
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{cohort_id}/stages/{stage}/run", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut
)
async def run_stage(
    cohort_id: uuid.UUID, stage: Stage, ctx: Publishing, body: StageRunRequest | None = None
) -> JobOut:
    """Run one stage on the whole cohort; the previous stage must be completed (409 otherwise)."""
    started = await runs.start_stage(
        ctx.pool, ctx.settings, cohort_id, stage, (body or StageRunRequest()).config
    )
    return JobOut.from_row(started.jobs[0])


@router.post("/{cohort_id}/pipeline", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
async def run_pipeline(
    cohort_id: uuid.UUID, ctx: Publishing, body: PipelineRequest | None = None
) -> RunOut:
    """Run every remaining stage in order (anonymization only when the cohort enables it)."""
    started = await runs.start_pipeline(
        ctx.pool, ctx.settings, cohort_id, (body or PipelineRequest()).configs()
    )
    return RunOut(
        run_id=started.run_id,
        cohort_id=cohort_id,
        jobs=[JobOut.from_row(j) for j in started.jobs],
    )


@router.get("/{cohort_id}/jobs", response_model=list[JobOut])
async def cohort_jobs(
    cohort_id: uuid.UUID, ctx: Context, limit: int = Query(100, ge=1, le=1000)
) -> list[JobOut]:
    async with ctx.pool.acquire() as conn:
        await _existing(conn, cohort_id)
        rows = await repo.list_jobs(
            conn, cohort_id=cohort_id, status=None, stage=None, limit=limit, offset=0
        )
    return [JobOut.from_row(r) for r in rows]
