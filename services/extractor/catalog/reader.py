"""A one-pass header reader for the common case: Part 10 content in little-endian VR encodings.

pydicom reads a header into raw elements, and the catalog then decodes every element once more into
the DICOM JSON model: two passes in Python over ~400 elements per file. Here one pass walks the bytes and
writes the DICOM JSON directly (through the same `header_json.value_json` decoding), which makes the
whole parse about as cheap as pydicom's read alone.

The reader only takes content it fully understands: a 128-byte preamble, `DICM`, explicit VR little
endian file meta, and a data set in implicit or explicit VR little endian (native or encapsulated pixel
data). Anything else - big endian, deflate, a data set without file meta, a value running past the end,
an element header that is not one, VR switching inside sequences - raises `ReaderDeclined`, and the
caller reads the content with pydicom instead, which also names what is wrong with a damaged file.
"""

from __future__ import annotations

import codecs
import functools
import struct
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import convert_encodings, default_encoding

from .header_json import MAX_VALUE_BYTES, resolve_vr, tag_key, value_json

try:  # the same reader compiled (pip install builds it); without it the Python reader does all
    from . import _fastreader as _fastreader  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastreader = None
from .sop_class import DICOMDIR_SOP_CLASS

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# syntaxes whose data set is not little-endian VR-encoded bytes in place
DECLINED_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_REPRESENTATION = 0x00280103
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_VALID_VRS = _LONG_LENGTH_VRS | frozenset(
    [
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "SL",
        "SS",
        "ST",
        "TM",
        "UI",
        "UL",
        "US",
    ]
)
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<H")
_LONG = struct.Struct("<L")
_ITEM_HEADER = struct.Struct("<HHL")


class ReaderDeclined(Exception):
    """The content is not in the shape this reader handles; read it with pydicom."""


@dataclass(slots=True)
class HeaderRead:
    """One header, read by either reader: what the parser needs to build records.

    `json` is the whole data set as DICOM JSON (every Per-frame Functional Groups item kept);
    `private` holds the raw bytes of top-level private elements (odd groups), because implicit-VR files
    do not say their VR and because vendor blobs (Siemens CSA) are too large for the stored JSON.
    """

    json: dict[str, Any]
    transfer_syntax_uid: str | None
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    little_endian: bool
    implicit_vr: bool
    pixel_offset: int | None  # where the Pixel Data element starts; None when the header has none
    private: dict[int, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class _State:
    implicit: bool
    encodings: list[str]
    max_value_bytes: int
    pixel_rep: int = 0
    pixel_offset: int | None = None
    private: dict[int, bytes] = field(default_factory=dict)


def read_header(content: bytes, *, max_value_bytes: int = MAX_VALUE_BYTES) -> HeaderRead:
    """Read a Part 10 header in one pass, or raise `ReaderDeclined`."""
    if len(content) < 144 or content[128:132] != b"DICM":
        raise ReaderDeclined("no preamble")
    meta, position = _file_meta(content)
    syntax = meta.get(0x00020010)
    if syntax is None or syntax in DECLINED_SYNTAXES:
        raise ReaderDeclined(f"transfer syntax {syntax}")
    state = _State(syntax == IMPLICIT_VR_LITTLE_ENDIAN, [default_encoding], max_value_bytes)
    try:
        if meta.get(0x00020002) == DICOMDIR_SOP_CLASS:
            data: dict[
                str, Any
            ] = {}  # a media directory: its records are never catalogued, skip them
        else:
            fast = _fast_dataset(content, position, state) if _fastreader else None
            if fast is not None:
                data = fast
            else:
                data, _ = _dataset(content, position, len(content), state, top=True)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, LookupError) as exc:
        raise ReaderDeclined(str(exc)) from exc
    return HeaderRead(
        json=data,
        transfer_syntax_uid=syntax,
        media_sop_class_uid=meta.get(0x00020002),
        media_sop_instance_uid=meta.get(0x00020003),
        little_endian=True,
        implicit_vr=state.implicit,
        pixel_offset=state.pixel_offset,
        private=state.private,
    )


def _fast_dataset(content: bytes, position: int, state: _State) -> dict[str, Any] | None:
    """The data set read by the C reader, or None when it leaves the file to the Python one."""
    assert _fastreader is not None
    try:
        data, offset, private = _fastreader.read(
            content, position, state.implicit, state.max_value_bytes, resolve_vr, _charset_kind
        )
    except _fastreader.Unhandled:
        return None
    state.pixel_offset, state.private = offset, private
    dataset: dict[str, Any] = data
    return dataset


@functools.lru_cache(maxsize=64)
def _charset_kind(raw: bytes) -> int:
    """For the C reader: 0 when text decodes as latin-1 (the default repertoire, ISO_IR 100), 1 for
    UTF-8 (ISO_IR 192), -1 for anything else (the Python reader then reads the file)."""
    names = raw.decode("ascii", "replace").strip("\x00 ").split("\\")
    encodings = convert_encodings([n.strip() for n in names]) if raw.strip() else [default_encoding]
    if len(encodings) != 1:
        return -1
    try:
        name = codecs.lookup(encodings[0]).name
    except LookupError:
        return -1
    return {"iso8859-1": 0, "utf-8": 1}.get(name, -1)


def _explicit_header(content: bytes, position: int) -> tuple[str, int, int] | None:
    """(VR, value length, value start) of an explicit-VR element header at `position`, or None
    when the two bytes after the tag are not a VR."""
    vr = content[position + 4 : position + 6].decode("latin-1")
    if vr in _LONG_LENGTH_VRS:
        return vr, _LONG.unpack_from(content, position + 8)[0], position + 12
    if vr in _VALID_VRS:
        return vr, _SHORT.unpack_from(content, position + 6)[0], position + 8
    return None


def _file_meta(content: bytes) -> tuple[dict[int, str], int]:
    """Group 0002 (always explicit VR little endian): its UIDs, and where the data set starts."""
    position = 132
    meta: dict[int, str] = {}
    end = len(content)
    while position + 8 <= end:
        group, element = _TAG.unpack_from(content, position)
        if group != 0x0002:
            break
        header = _explicit_header(content, position)
        if header is None:
            raise ReaderDeclined("file meta is not explicit VR")
        vr, length, start = header
        if length == UNDEFINED or start + length > end:
            raise ReaderDeclined("file meta element runs past the end")
        if vr == "UI":
            meta[0x00020000 | element] = (
                content[start : start + length].decode("ascii", "replace").strip("\x00 ")
            )
        position = start + length
    return meta, position


def _dataset(
    content: bytes, position: int, end: int, state: _State, *, top: bool = False
) -> tuple[dict[str, Any], int]:
    """Elements from `position` up to `end` (or an item delimiter); returns the JSON and where it stopped."""
    out: dict[str, Any] = {}
    implicit = state.implicit
    while position < end:
        if position + 8 > end:
            raise ReaderDeclined("element header cut")
        group, element = _TAG.unpack_from(content, position)
        tag = group << 16 | element
        if tag == ITEM_DELIMITER:
            return out, position + 8
        if top and tag in PIXEL_DATA_TAGS:
            state.pixel_offset = position
            return out, position
        if group == 0xFFFE:
            raise ReaderDeclined("item tag inside a data set")
        if implicit:
            vr = None
            (length,) = _LONG.unpack_from(content, position + 4)
            start = position + 8
        else:
            header = _explicit_header(content, position)
            if header is None:
                raise ReaderDeclined(f"not an explicit VR at byte {position}")
            vr, length, start = header
        resolved = resolve_vr(tag, vr, state.pixel_rep)
        skip = element == 0 or group == 0x0002 or tag > 0xFFFC0000
        if length == UNDEFINED:
            if resolved == "UN" or resolved == "SQ":
                # an undefined-length UN is a sequence in implicit VR little endian (PS3.5 6.2.2)
                items, position = _sequence(
                    content, start, len(content), state, vr == "UN" or implicit
                )
                if not skip:
                    out[tag_key(tag)] = {"vr": "SQ", "Value": items}
                continue
            raise ReaderDeclined(f"undefined length on a non-sequence at byte {position}")
        stop = start + length
        if stop > end:
            raise ReaderDeclined(f"value runs past the end at byte {position}")
        if resolved == "SQ":
            items, _ = _sequence(content, start, stop, state, implicit or vr == "UN")
            if not skip:
                out[tag_key(tag)] = {"vr": "SQ", "Value": items}
        elif not skip:
            raw = content[start:stop]
            if top:
                if group & 1:
                    state.private[tag] = raw
                elif tag == SPECIFIC_CHARACTER_SET:
                    names = raw.decode("ascii", "replace").strip("\x00 ").split("\\")
                    state.encodings = (
                        convert_encodings([n.strip() for n in names])
                        if raw.strip()
                        else [default_encoding]
                    )
                elif tag == PIXEL_REPRESENTATION and length >= 2:
                    state.pixel_rep = _SHORT.unpack_from(raw)[0]
            out[tag_key(tag)] = value_json(
                raw, resolved, True, state.encodings, state.max_value_bytes
            )
        position = stop
    return out, position


def _sequence(
    content: bytes, position: int, end: int, state: _State, implicit: bool
) -> tuple[list[dict[str, Any]], int]:
    """Items of a sequence value from `position`; stops at `end` or at a Sequence Delimitation Item."""
    if implicit != state.implicit:
        raise ReaderDeclined("sequence encoded in another VR mode")
    items: list[dict[str, Any]] = []
    while position < end:
        group, element, length = _ITEM_HEADER.unpack_from(content, position)
        tag = group << 16 | element
        position += 8
        if tag == SEQUENCE_DELIMITER:
            return items, position
        if tag != ITEM:
            raise ReaderDeclined(f"expected an item at byte {position - 8}")
        if length == UNDEFINED:
            item, position = _dataset(content, position, end, state)
        else:
            if position + length > end:
                raise ReaderDeclined("item runs past the end")
            item, _ = _dataset(content, position, position + length, state)
            position += length
        items.append(item)
    return items, position
