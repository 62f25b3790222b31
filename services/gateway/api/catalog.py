"""The cohort's catalog (series, stacks, classification) and its export files, with downloads."""

from __future__ import annotations

import asyncio
import mimetypes
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from services.gateway import catalog
from services.gateway import repository as repo
from services.gateway.api.auth import sign_path
from services.gateway.api.dependencies import Context
from services.gateway.api.schemas import MAX_OFFSET, ExportFileOut, ExportOut, SeriesOut
from services.gateway.errors import NotFound
from shared.storage import ObjectStore
from shared.topics import Stage

router = APIRouter(prefix="/cohorts", tags=["catalog"])

_CHUNK = 4 * 1024 * 1024


@router.get("/{cohort_id}/series", response_model=list[SeriesOut])
async def cohort_series(
    cohort_id: uuid.UUID,
    ctx: Context,
    limit: int = Query(1000, ge=1, le=10000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[SeriesOut]:
    """Series with their stacks; classification fields are null until sorting has run."""
    async with ctx.pool.acquire() as conn:
        if await repo.get_cohort(conn, cohort_id) is None:
            raise NotFound(f"no cohort with id {cohort_id}")
        rows = await catalog.cohort_series(conn, cohort_id, limit=limit, offset=offset)
    return [SeriesOut.model_validate(r) for r in rows]


async def _export_job(ctx: Context, cohort_id: uuid.UUID, job_id: uuid.UUID) -> str:
    async with ctx.pool.acquire() as conn:
        job = await repo.get_job(conn, job_id)
    if job is None or job["cohort_id"] != cohort_id or job["stage"] != Stage.export.value:
        raise NotFound(f"no export job {job_id} in cohort {cohort_id}")
    return str(job["status"])


@router.get("/{cohort_id}/exports/{job_id}", response_model=ExportOut)
async def export_files(cohort_id: uuid.UUID, job_id: uuid.UUID, ctx: Context) -> ExportOut:
    """The files an export job wrote (empty until the exporter has recorded them)."""
    status = await _export_job(ctx, cohort_id, job_id)
    async with ctx.pool.acquire() as conn:
        rows = await catalog.export_manifest(conn, cohort_id, job_id)
    base = f"/api/cohorts/{cohort_id}/exports/{job_id}/files/"
    files = [
        ExportFileOut(
            **{k: r[k] for k in ExportFileOut.model_fields if k != "download_url"},
            download_url=sign_path(ctx.settings, base + quote(r["path"])),
        )
        for r in rows
    ]
    return ExportOut(cohort_id=cohort_id, job_id=job_id, status=status, files=files)  # type: ignore[arg-type]


@router.get(
    "/{cohort_id}/exports/{job_id}/files/{path:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_export_file(
    cohort_id: uuid.UUID, job_id: uuid.UUID, path: str, ctx: Context
) -> StreamingResponse:
    """One file of the export, streamed from object storage (only files in the manifest)."""
    await _export_job(ctx, cohort_id, job_id)
    async with ctx.pool.acquire() as conn:
        row = await catalog.export_file(conn, cohort_id, job_id, path)
    if row is None:
        raise NotFound(f"no file {path!r} in export {job_id}")
    store: ObjectStore = ctx.store
    info = await asyncio.to_thread(store.stat, row["object_key"])
    if info is None:
        raise NotFound(f"the object behind {path!r} is missing from storage")

    async def chunks() -> AsyncIterator[bytes]:
        offset = 0
        while offset < info.size:
            length = min(_CHUNK, info.size - offset)
            yield await asyncio.to_thread(store.get_range, row["object_key"], offset, length)
            offset += length

    name = path.rsplit("/", 1)[-1]
    media = "application/gzip" if name.endswith(".gz") else mimetypes.guess_type(name)[0]
    headers = {
        "Content-Length": str(info.size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
    }
    if row["sha256"]:
        headers["X-Checksum-SHA256"] = row["sha256"]
    return StreamingResponse(
        chunks(), media_type=media or "application/octet-stream", headers=headers
    )
