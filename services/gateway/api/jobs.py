"""Jobs: one stage run each; their progress, errors, transitions, and cancelling them."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from services.gateway import repository as repo
from services.gateway import runs
from services.gateway.api.dependencies import Context, Publishing
from services.gateway.api.schemas import MAX_OFFSET, JobEventOut, JobOut, JobStatusName
from services.gateway.errors import NotFound
from services.gateway.job_watch import etag_of, held_until_changed, wait_preference
from shared.topics import Stage

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get(
    "",
    response_model=list[JobOut],
    responses={304: {"description": "held for `Prefer: wait`: the jobs did not change"}},
)
async def list_jobs(
    ctx: Context,
    request: Request,
    response: Response,
    cohort_id: uuid.UUID | None = None,
    run_id: uuid.UUID | None = None,
    status: JobStatusName | None = None,
    stage: Stage | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> Any:
    """Newest runs first, the jobs of a run in stage order.

    The answer has an `ETag`. Sent back as `If-None-Match` with `Prefer: wait=N` (seconds, at most
    10), the request is held until the answer differs (a job changed: its progress, status or
    reason) and then answers 200 with it, or after N seconds 304: how a client follows a run
    (`run_id`) without polling, and hears of its end at once."""

    async def read() -> list[dict[str, Any]]:
        async with ctx.pool.acquire() as conn:
            rows = await repo.list_jobs(
                conn,
                cohort_id=cohort_id,
                status=status,
                stage=stage.value if stage else None,
                limit=limit,
                offset=offset,
                run_id=run_id,
            )
        return [JobOut.from_row(r).model_dump(mode="json") for r in rows]

    known = request.headers.get("if-none-match")
    wait_s = wait_preference(request.headers.get("prefer"))
    jobs, tag = await held_until_changed(ctx.job_watch, run_id, read, etag_of, known, wait_s)
    if tag == known:
        return Response(status_code=304, headers={"ETag": tag})
    response.headers["ETag"] = tag
    return jobs


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: uuid.UUID, ctx: Context) -> JobOut:
    async with ctx.pool.acquire() as conn:
        job = await repo.get_job(conn, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return JobOut.from_row(job)


@router.get("/{job_id}/events", response_model=list[JobEventOut])
async def job_events(job_id: uuid.UUID, ctx: Context) -> list[JobEventOut]:
    """The job's status transitions, oldest first, with what caused each."""
    async with ctx.pool.acquire() as conn:
        if await repo.get_job(conn, job_id) is None:
            raise NotFound(f"no job with id {job_id}")
        rows = await repo.job_events(conn, job_id)
    return [JobEventOut(**{k: r[k] for k in JobEventOut.model_fields}) for r in rows]


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: uuid.UUID, ctx: Publishing) -> JobOut:
    """Cancel the job (and the later jobs of its run): the workers stop between items."""
    return JobOut.from_row(await runs.cancel_job(ctx.pool, job_id))
