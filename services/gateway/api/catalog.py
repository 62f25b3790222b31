"""The cohort's catalog (series, stacks, classification) and its export files, with downloads."""

from __future__ import annotations

import asyncio
import mimetypes
import tarfile
import uuid
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import quote

import asyncpg
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from minio.error import S3Error

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


async def _export_job(conn: asyncpg.Connection, cohort_id: uuid.UUID, job_id: uuid.UUID) -> str:
    job = await repo.job_brief(conn, job_id)
    if job is None or job["cohort_id"] != cohort_id or job["stage"] != Stage.export.value:
        raise NotFound(f"no export job {job_id} in cohort {cohort_id}")
    return str(job["status"])


@router.get("/{cohort_id}/exports/{job_id}", response_model=ExportOut)
async def export_files(cohort_id: uuid.UUID, job_id: uuid.UUID, ctx: Context) -> ExportOut:
    """The files an export job wrote (empty until the exporter has recorded them)."""
    async with ctx.pool.acquire() as conn:
        status = await _export_job(conn, cohort_id, job_id)
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


def _first_part(store: ObjectStore, key: str, size: int) -> bytes | None:
    """The object's first `_CHUNK` bytes (all of a small file), or None when it is missing."""
    try:
        if size == 0:  # no byte range to ask for: whether it exists is all there is to know
            return b"" if store.stat(key) is not None else None
        return store.get_range(key, 0, min(_CHUNK, size))
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return None
        raise


@router.get(
    "/{cohort_id}/exports/{job_id}/files/{path:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_export_file(
    cohort_id: uuid.UUID, job_id: uuid.UUID, path: str, ctx: Context
) -> StreamingResponse:
    """One file of the export, streamed from object storage (only files in the manifest)."""
    async with ctx.pool.acquire() as conn:
        await _export_job(conn, cohort_id, job_id)
        row = await catalog.export_file(conn, cohort_id, job_id, path)
    if row is None:
        raise NotFound(f"no file {path!r} in export {job_id}")
    store: ObjectStore = ctx.store
    key, size = row["object_key"], int(row["size"])
    # the manifest's size stands in for a stat (an export's objects are written once, with the
    # bytes the row describes): one request per file, not two; the first part is fetched before
    # answering, so a missing object is a 404 and not a cut-off stream
    first = await asyncio.to_thread(_first_part, store, key, size)
    if first is None:
        raise NotFound(f"the object behind {path!r} is missing from storage")

    name = path.rsplit("/", 1)[-1]
    media = "application/gzip" if name.endswith(".gz") else mimetypes.guess_type(name)[0]
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
    }
    if row["sha256"]:
        headers["X-Checksum-SHA256"] = row["sha256"]
    return StreamingResponse(
        _rest(store, key, size, first),
        media_type=media or "application/octet-stream",
        headers=headers,
    )


async def _rest(store: ObjectStore, key: str, size: int, first: bytes) -> AsyncIterator[bytes]:
    """An object's bytes from its first part on, `_CHUNK` at a time."""
    yield first
    offset = len(first)
    while offset < size:
        length = min(_CHUNK, size - offset)
        yield await asyncio.to_thread(store.get_range, key, offset, length)
        offset += length


@router.get(
    "/{cohort_id}/exports/{job_id}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
async def download_export_archive(
    cohort_id: uuid.UUID, job_id: uuid.UUID, ctx: Context
) -> StreamingResponse:
    """Every file of the export in one tar stream, in path order, each under its path: a whole
    tree in one request rather than one per file (`cohortflow run --out`). The objects are
    fetched a few ahead of the one being sent; one that is missing cuts the stream short."""
    async with ctx.pool.acquire() as conn:
        await _export_job(conn, cohort_id, job_id)
        rows = await catalog.export_manifest(conn, cohort_id, job_id)
    entries = [(str(r["path"]), str(r["object_key"]), int(r["size"])) for r in rows]
    headers = [_tar_header(path, size) for path, _, size in entries]
    length = sum(
        len(h) + size + _tar_padding(size) for h, (_, _, size) in zip(headers, entries, strict=True)
    )
    return StreamingResponse(
        _archive(ctx.store, entries, headers),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(length + _TAR_END),
            "Content-Disposition": f"attachment; filename=export-{job_id}.tar",
        },
    )


_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks close an archive
_AHEAD = 8  # objects fetched ahead of the one being sent


def _tar_header(path: str, size: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_padding(size: int) -> int:
    return -size % _TAR_BLOCK


async def _archive(
    store: ObjectStore, entries: list[tuple[str, str, int]], headers: list[bytes]
) -> AsyncIterator[bytes]:
    ahead: deque[asyncio.Task[bytes | None]] = deque()
    upcoming = iter(entries)
    try:
        for header, (path, key, size) in zip(headers, entries, strict=True):
            while len(ahead) < _AHEAD and (entry := next(upcoming, None)) is not None:
                ahead.append(
                    asyncio.create_task(asyncio.to_thread(_first_part, store, entry[1], entry[2]))
                )
            first = await ahead.popleft()
            if first is None:
                raise NotFound(f"the object behind {path!r} is missing from storage")
            yield header
            async for chunk in _rest(store, key, size, first):
                yield chunk
            if padding := _tar_padding(size):
                yield bytes(padding)
        yield bytes(_TAR_END)
    finally:
        for task in ahead:
            task.cancel()
