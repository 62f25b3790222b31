"""A stack's middle image as a PNG (services/gateway/thumbnails.py), cached in object storage."""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import APIRouter, Query
from fastapi.responses import Response

from services.gateway import repository as repo
from services.gateway import thumbnails
from services.gateway.api.dependencies import Context
from services.gateway.errors import NotFound
from shared.sources import SourceError, read_catalogued

router = APIRouter(prefix="/cohorts", tags=["catalog"])
log = logging.getLogger(__name__)


@router.get(
    "/{cohort_id}/series/{series_uid}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def stack_thumbnail(
    cohort_id: uuid.UUID,
    series_uid: str,
    ctx: Context,
    stack_key: str = Query(min_length=1, max_length=1024),
) -> Response:
    """The middle image of the stack (404 when it is not catalogued or holds no image)."""
    store = ctx.store
    key = thumbnails.cache_key(cohort_id, series_uid, stack_key)
    headers = {"Cache-Control": "private, max-age=3600"}
    async with ctx.pool.acquire() as conn:
        cohort = await repo.get_cohort(conn, cohort_id)
    if cohort is None:  # a deleted cohort shows nothing
        raise NotFound(f"no cohort with id {cohort_id}")
    if await asyncio.to_thread(store.exists, key):
        data = await asyncio.to_thread(store.get_bytes, key)
        return Response(data, media_type="image/png", headers=headers)
    async with ctx.pool.acquire() as conn:
        found = await thumbnails.middle_instance(conn, cohort_id, series_uid, stack_key)
    if found is None:
        raise NotFound("no catalogued image for this stack")
    object_key, sha256, frame = found
    try:
        dicom = await asyncio.to_thread(
            read_catalogued, store, object_key, sha256, cohort["source_path"], ctx.settings
        )
    except (SourceError, OSError) as exc:  # a file catalogued in place, changed or gone since
        raise NotFound(f"this stack's image cannot be read: {exc}") from exc
    try:
        data = await asyncio.to_thread(thumbnails.render_png, dicom, frame)
    except Exception as exc:  # undecodable pixel data, no image: no picture, not a 500
        log.info("no thumbnail", extra={"stack_key": stack_key, "error": str(exc)[:200]})
        raise NotFound(f"this stack has no picture: {exc}") from exc
    await asyncio.to_thread(store.put_bytes, key, data, content_type="image/png")
    return Response(data, media_type="image/png", headers=headers)
