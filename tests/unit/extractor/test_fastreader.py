"""The C header reader (`_fastreader`) must read exactly what the Python reader reads: on every file
of the shared data (all vendors, implicit and explicit VR, enhanced multi-frame, damaged files), the
DICOM JSON (with value types), the private elements and the pixel data offset are compared."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.extractor.catalog import reader
from services.extractor.catalog.reader import HeaderRead, ReaderDeclined, read_header


def test_the_c_reader_is_built_where_a_compiler_is() -> None:
    """`pip install -e .` builds it; a machine with a C compiler and no build is a broken setup
    (everything would still work, only slower, which no other test would notice)."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert reader._fastreader is not None, (
            "run scripts/bootstrap (pip install -e .) to build it"
        )


needs_c = pytest.mark.skipif(reader._fastreader is None, reason="no C compiler: Python reader only")


def read_with(content: bytes, fast: bool) -> HeaderRead | str:
    saved = reader._fastreader
    reader._fastreader = saved if fast else None
    try:
        return read_header(content)
    except ReaderDeclined as exc:
        return f"declined: {exc}"
    finally:
        reader._fastreader = saved


def canonical(header: HeaderRead | str) -> Any:
    if isinstance(header, str):
        return header.split(":")[0]
    return (
        json.dumps(header.json, sort_keys=True),  # ints and floats stay apart ("1" vs "1.0")
        header.pixel_offset,
        header.private,
        header.transfer_syntax_uid,
    )


@needs_c
def test_same_header_as_the_python_reader_on_every_file(dicom_root: Path) -> None:
    files = sorted(Path(d) / n for d, _, names in os.walk(dicom_root) for n in names)
    compared = 0
    for path in files:
        content = path.read_bytes()
        if content[128:132] != b"DICM":
            continue
        python = read_with(content, fast=False)
        fast = read_with(content, fast=True)
        assert canonical(fast) == canonical(python), path.relative_to(dicom_root)
        compared += not isinstance(python, str)
    assert compared > 1500


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OW"):
        return (
            group.to_bytes(2, "little")
            + element.to_bytes(2, "little")
            + vr
            + b"\0\0"
            + len(value).to_bytes(4, "little")
            + value
        )
    return (
        group.to_bytes(2, "little")
        + element.to_bytes(2, "little")
        + vr
        + len(value).to_bytes(2, "little")
        + value
    )


def _file(*elements: bytes) -> bytes:
    syntax = b"1.2.840.10008.1.2.1\0"
    meta = _element(0x00020010, b"UI", syntax)
    return b"\0" * 128 + b"DICM" + meta + b"".join(elements)


@needs_c
@pytest.mark.parametrize(
    "elements",
    [
        # numbers as text: malformed, empty parts, exponents, integers written as decimals
        [
            _element(0x00180050, b"DS", b"1.5\\ApTx:\\\\2e1 \\7 "),
            _element(0x00200013, b"IS", b" 12\0"),
        ],
        # names with groups and empty components, UTF-8 text, a multi-valued code string
        [
            _element(0x00080005, b"CS", b"ISO_IR 192"),
            _element(0x00100010, b"PN", "Müller^Jürgen==ミュラー\\".encode()),
            _element(0x00081030, b"LO", "Étude\\\\".encode()),
            _element(0x00080008, b"CS", b"ORIGINAL\\PRIMARY\\ \\"),
        ],
        # binary numbers, attribute tags, a value that is only padding, an inline binary
        [
            _element(0x00280010, b"US", b"\x00\x02\xff\xff"),
            _element(0x00189219, b"FD", b"\x00\x00\x00\x00\x00\x00\xf8\x7f"),  # NaN
            _element(0x00209165, b"AT", b"\x18\x00\x50\x00"),
            _element(0x00081040, b"LO", b"   "),
            _element(0x00291010, b"OB", b"\x01\x02\x03\x04\x05"),
        ],
        # a character set the C reader leaves to Python
        [
            _element(0x00080005, b"CS", b"ISO_IR 144"),
            _element(0x00100010, b"PN", "Пушкин".encode("iso8859_5")),
        ],
    ],
)
def test_edge_values_read_the_same(elements: list[bytes]) -> None:
    content = _file(*elements)
    assert canonical(read_with(content, fast=True)) == canonical(read_with(content, fast=False))
