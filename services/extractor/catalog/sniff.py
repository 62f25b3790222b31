"""Is this content DICOM? Decided from the bytes, never from a file name or extension.

Two shapes are accepted:
- a Part 10 file (PS3.10 7.1): a 128-byte preamble followed by the magic `DICM` and the File Meta
  Information (group 0002);
- a bare data set stream without preamble (what some PACS exports and old scanners write): the content
  starts with an element of group 0002 or 0008 (Identifying), in implicit or explicit VR, little or big
  endian.

The check after parsing (`pixel_data_truncation`) finds files cut short: a Pixel Data (7FE0,0010)
element whose declared length runs past the end of the content, or encapsulated (compressed) pixel data
whose fragments do not reach the Sequence Delimitation Item.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Literal

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
# how many leading bytes `sniff` needs
SNIFF_BYTES = PREAMBLE_LENGTH + len(MAGIC) + 12
NOT_DICOM = "not DICOM: no DICM magic and no parseable data set"

_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_PIXEL_VRS = frozenset(b"OB OD OF OL OV OW UN".split())
_START_GROUPS = (0x0002, 0x0008)
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Sniff:
    """The verdict on the first bytes of some content.

    `kind` is "part10" (preamble + DICM), "stream" (a data set starting at offset 0) or "none";
    `reason` explains a "none" verdict.
    """

    kind: Literal["part10", "stream", "none"]
    reason: str = ""

    @property
    def is_dicom(self) -> bool:
        return self.kind != "none"


def sniff(head: bytes) -> Sniff:
    """Classify content from its first `SNIFF_BYTES` bytes (more is fine)."""
    if len(head) >= PREAMBLE_LENGTH + 4 and head[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC:
        return Sniff("part10")
    if _starts_with_element(head):
        return Sniff("stream")
    if (
        len(head) < PREAMBLE_LENGTH + 4
        and head.startswith(b"\x00" * min(len(head), PREAMBLE_LENGTH))
        and head
    ):
        return Sniff("none", "truncated: ends inside the 128-byte preamble")
    return Sniff("none", NOT_DICOM)


def _starts_with_element(head: bytes) -> bool:
    """True when offset 0 holds a plausible group 0002/0008 element header (any of the three encodings)."""
    if len(head) < 8:
        return False
    for endian in ("<", ">"):
        group, _element = struct.unpack(f"{endian}HH", head[:4])
        if group not in _START_GROUPS:
            continue
        vr = head[4:6]
        if vr in _EXPLICIT_VRS:
            if vr in _LONG_LENGTH_VRS:
                return head[6:8] == b"\x00\x00"
            return True
        if endian == "<":
            (length,) = struct.unpack("<L", head[4:8])
            # implicit VR little endian: a short value or an undefined-length sequence
            if length < 0x10000 or length == _UNDEFINED:
                return True
    return False


def pixel_data_truncation(fp: BinaryIO, offset: int, size: int, little_endian: bool) -> str | None:
    """Why the pixel data element at `offset` is incomplete, or None when it is whole.

    `size` is the total content length. Native pixel data must fit its declared length; encapsulated pixel
    data (undefined length) is walked item by item up to its Sequence Delimitation Item. Whether the
    element header carries a VR is read from the bytes: some writers encode implicit VR under an explicit
    transfer syntax.
    """
    end = "<" if little_endian else ">"
    fp.seek(offset)
    header = fp.read(12)
    if len(header) < 8:
        return f"truncated: Pixel Data element header cut at byte {offset + len(header)}"
    if header[4:6] not in _PIXEL_VRS:
        (length,) = struct.unpack(f"{end}L", header[4:8])
        value_at = offset + 8
    elif header[4:6] in _LONG_LENGTH_VRS:
        if len(header) < 12:
            return f"truncated: Pixel Data element header cut at byte {offset + len(header)}"
        (length,) = struct.unpack(f"{end}L", header[8:12])
        value_at = offset + 12
    else:
        (length,) = struct.unpack(f"{end}H", header[6:8])
        value_at = offset + 8
    if length != _UNDEFINED:
        if value_at + length > size:
            return (
                f"truncated: Pixel Data declares {length} bytes, {max(size - value_at, 0)} present"
            )
        return None
    position = value_at
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            return f"truncated: encapsulated Pixel Data ends at byte {size} without a sequence delimiter"
        tag_group, tag_element, item_length = struct.unpack("<HHL", item)
        tag = tag_group << 16 | tag_element
        if tag == _SEQUENCE_DELIMITER:
            return None
        if tag != _ITEM or item_length == _UNDEFINED:
            return f"truncated: encapsulated Pixel Data broken at byte {position} (tag {tag:08X})"
        position += 8 + item_length
        if position > size:
            return f"truncated: Pixel Data fragment runs {position - size} bytes past the end"
