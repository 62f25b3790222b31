"""Vendor headers that hide text from a plain search: GE's compressed Protocol Data Block.

GE writes (0025,xx1B) of `GEMS_SERS_01` as a little-endian uint32 length followed by a gzip stream
of `KEY "value"` lines (slice order, view order, series description, protocol UIDs, notes). dcm2niix
reads it for slice order and phase encoding, so it is kept, but its text is cleaned like any other
kept vendor text and verification searches the decompressed text.
"""

from __future__ import annotations

import gzip
import struct
import zlib

GZIP_MAGIC = b"\x1f\x8b"


def unpack_gzip_block(data: bytes) -> bytes | None:
    """The decompressed text of a length-prefixed gzip block, None when `data` is not one."""
    if len(data) < 8 or data[4:6] != GZIP_MAGIC:
        return None
    (length,) = struct.unpack("<I", data[:4])
    try:
        return gzip.decompress(data[4 : 4 + length])
    except (OSError, EOFError, zlib.error):
        return None


def pack_gzip_block(text: bytes) -> bytes:
    """`text` as a length-prefixed gzip block of even length (a DICOM value)."""
    compressed = gzip.compress(text, mtime=0)
    out = struct.pack("<I", len(compressed)) + compressed
    return out + b"\x00" if len(out) % 2 else out
