"""Stack pictures: a real DICOM image becomes a small, decodable grayscale PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from services.gateway.thumbnails import MAX_SIDE, png_gray, render_png


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    data = b""
    at = 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        body = png[at + 8 : at + 8 + length]
        assert struct.unpack(">I", png[at + 8 + length : at + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        if kind == b"IDAT":
            data += body
        at += 12 + length
    rows = np.frombuffer(zlib.decompress(data), np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:]


def test_png_round_trips() -> None:
    image = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    assert (decode(png_gray(image)) == image).all()


def test_a_real_slice_is_rendered_small_and_windowed(dicom_root: Path) -> None:
    source = dicom_root / "dcm_qa_deident" / "In" / "00100.dcm"
    image = decode(render_png(source.read_bytes()))
    assert max(image.shape) <= MAX_SIDE and min(image.shape) > 16
    assert image.min() == 0 and image.max() == 255
