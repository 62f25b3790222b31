"""A picture of a stack: its middle image as a small grayscale PNG, from the DICOM the catalog holds
(for an anonymized cohort the de-identified copy: the catalog only knows that one).

PNG is written with zlib and struct (no imaging library): 8-bit grayscale, one filter byte per row.
Rendered once per stack and cached in object storage under `thumbnails/<cohort>/`, removed with the
cohort.
"""

from __future__ import annotations

import hashlib
import io
import struct
import uuid
import zlib

import asyncpg
import numpy as np
import pydicom

from shared.db import relation_exists

MAX_SIDE = 256
PREFIX = "thumbnails"


def cache_key(cohort_id: uuid.UUID, series_uid: str, stack_key: str) -> str:
    digest = hashlib.sha256(f"{series_uid}\n{stack_key}".encode()).hexdigest()[:32]
    return f"{PREFIX}/{cohort_id}/{digest}.png"


def cohort_prefix(cohort_id: uuid.UUID) -> str:
    return f"{PREFIX}/{cohort_id}/"


async def middle_instance(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, series_uid: str, stack_key: str
) -> tuple[str, str | None, int] | None:
    """(object key, SHA-256, frame index) of the stack's middle image, or None when it is not
    catalogued. The key may locate a file read in place (`shared.sources.read_catalogued`)."""
    if not await relation_exists(conn, "catalog.stack_summary_v"):
        return None
    members = await conn.fetchval(
        "SELECT sop_instance_uids FROM catalog.stack_summary_v"
        " WHERE cohort_id = $1 AND series_instance_uid = $2 AND stack_key = $3",
        cohort_id,
        series_uid,
        stack_key,
    )
    rows = await conn.fetch(
        "SELECT object_key, sha256, n_frames FROM catalog.instance_v"
        " WHERE cohort_id = $1 AND series_instance_uid = $2"
        + (" AND sop_instance_uid = ANY($3::text[])" if members else "")
        + " ORDER BY instance_number NULLS LAST, sop_instance_uid",
        cohort_id,
        series_uid,
        *([list(members)] if members else []),
    )
    if not rows:
        return None
    if len(rows) == 1:  # one multi-frame object: its middle frame
        first = rows[0]
        return first["object_key"], first["sha256"], max(int(first["n_frames"] or 1), 1) // 2
    middle = rows[len(rows) // 2]
    return middle["object_key"], middle["sha256"], 0


def render_png(dicom: bytes, frame: int = 0) -> bytes:
    """The image (`frame` of a multi-frame object) windowed to its 1st-99th percentile, at most
    MAX_SIDE pixels a side. Raises ValueError when the object holds no displayable image."""
    ds = pydicom.dcmread(io.BytesIO(dicom))
    if "PixelData" not in ds:
        raise ValueError("the object holds no image")
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 4:  # frames of colour samples: keep the first channel
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[min(frame, pixels.shape[0] - 1)]
    elif pixels.ndim == 3:  # one colour image
        pixels = pixels[..., 0]
    return png_gray(to_uint8(pixels.astype(np.float64)))


def to_uint8(image: np.ndarray) -> np.ndarray:
    step = max(1, -(-max(image.shape) // MAX_SIDE))
    image = image[::step, ::step]
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 0.0)
    if high <= low:
        high = low + 1
    return (np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def png_gray(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 2-D uint8 array."""
    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
