"""Links a browser can open without the token (signed, short-lived), and the audit export download."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from services.gateway import repository as repo
from services.gateway.api.auth import LINK_TTL_S, sign_path
from services.gateway.api.dependencies import Context
from services.gateway.errors import NotFound

router = APIRouter(tags=["downloads"])

_AUDIT_MEDIA = {"xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


class LinkRequest(BaseModel):
    path: str = Field(pattern=r"^/api/[^?#\x00-\x1f]*$", max_length=4096)


class LinkOut(BaseModel):
    url: str
    expires_at: datetime


@router.post("/download-links", response_model=LinkOut)
async def download_link(body: LinkRequest, ctx: Context) -> LinkOut:
    """A link to GET `path` (URL-quoted) without the token, valid for an hour: for a new tab or
    an image. Without an API token the path itself."""
    expires = datetime.fromtimestamp(datetime.now(UTC).timestamp() + LINK_TTL_S, UTC)
    return LinkOut(url=sign_path(ctx.settings, body.path), expires_at=expires)


@router.get(
    "/jobs/{job_id}/audit-export",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def audit_export(job_id: uuid.UUID, ctx: Context) -> Response:
    """The encrypted audit export an anonymization job wrote (opened with its password)."""
    async with ctx.pool.acquire() as conn:
        job = await repo.get_job(conn, job_id)
    summary = (job["summary"] or {}) if job is not None else {}
    key = summary.get("audit_object")
    if job is None or job["stage"] != "anonymization" or not key:
        raise NotFound(f"no audit export written by job {job_id}")
    store = ctx.store
    bucket = summary.get("audit_bucket") or store.audit_bucket
    if await asyncio.to_thread(store.stat, key, bucket) is None:
        raise NotFound(f"the audit export of job {job_id} is missing from storage")
    data = await asyncio.to_thread(store.get_bytes, key, bucket)
    name = str(key).rsplit("/", 1)[-1]
    suffix = name.rsplit(".", 1)[-1]
    return Response(
        data,
        media_type=_AUDIT_MEDIA.get(suffix, "application/octet-stream"),
        headers={"Content-Disposition": f'attachment; filename="audit-{name}"'},
    )
