"""Vendor private attributes, located through their private creators (table: `data/private_tags.json`).

A private attribute has no fixed tag: a creator element (gggg,00xx) holding e.g. "SIEMENS MR HEADER"
reserves the block (gggg,xx00-xxFF), and the vendor's attribute sits at a fixed offset in that block.
Implicit-VR files do not say the VR, so the table does, and values are decoded from the raw bytes here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from pydicom.dataset import Dataset

_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}


@dataclass(frozen=True, slots=True)
class PrivateTag:
    name: str
    group: int
    creator: str
    element: int  # offset inside the creator's block
    vr: str


@lru_cache(maxsize=1)
def private_tag_table() -> dict[str, PrivateTag]:
    """Load `data/private_tags.json` (once), by name."""
    text = (
        resources.files(__package__).joinpath("data/private_tags.json").read_text(encoding="utf-8")
    )
    rows = json.loads(text)["tags"]
    return {
        row["name"]: PrivateTag(
            row["name"], int(row["group"], 16), row["creator"], int(row["element"], 16), row["vr"]
        )
        for row in rows
    }


def private_elements(ds: Dataset) -> dict[int, bytes]:
    """Raw bytes of the top-level private elements (odd groups) of a pydicom data set."""
    out: dict[int, bytes] = {}
    for base_tag, elem in ds.items():
        tag = int(base_tag)
        if not tag >> 16 & 1 or not tag & 0xFFFF or elem.VR == "SQ":
            continue
        if isinstance(elem.value, bytes):
            out[tag] = elem.value
        elif isinstance(
            elem.value, str
        ):  # a creator pydicom already decoded to look up a private tag
            out[tag] = elem.value.encode("latin-1", "replace")
    return out


def private_creators(private: dict[int, bytes]) -> dict[tuple[int, str], int]:
    """(group, creator) -> block number for every private creator element (gggg,0010-00FF)."""
    blocks: dict[tuple[int, str], int] = {}
    for tag, value in private.items():
        if 0x10 <= tag & 0xFFFF <= 0xFF:
            blocks[(tag >> 16, value.decode("latin-1").strip(" \x00"))] = tag & 0xFF
    return blocks


def read_private(
    private: dict[int, bytes],
    name: str,
    creators: dict[tuple[int, str], int],
    *,
    little_endian: bool = True,
) -> list[Any] | bytes | None:
    """The values of private attribute `name`, decoded by the table's VR (bytes for OB/UN), or None."""
    spec = private_tag_table()[name]
    block = creators.get((spec.group, spec.creator))
    if block is None:
        return None
    value = private.get(spec.group << 16 | block << 8 | spec.element)
    if not value:
        return None
    if spec.vr in ("OB", "UN"):
        return value
    if spec.vr in _BINARY_FORMATS:
        fmt = _BINARY_FORMATS[spec.vr]
        size = struct.calcsize("<" + fmt)
        endian = "<" if little_endian else ">"
        count = len(value) // size
        return (
            list(struct.unpack(f"{endian}{count}{fmt}", value[: count * size])) if count else None
        )
    text = value.decode("latin-1").strip(" \x00")
    if not text:
        return None
    parts = [p.strip() for p in text.split("\\")]
    if spec.vr in ("DS", "IS"):
        numbers: list[Any] = []
        for part in parts:
            try:
                numbers.append(float(part))
            except ValueError:
                numbers.append(None)
        return numbers
    return parts


@dataclass(frozen=True, slots=True)
class PrivateTags:
    """The private elements of one header, looked up by their name in the table."""

    raw: dict[int, bytes]
    creators: dict[tuple[int, str], int]
    little_endian: bool = True

    @classmethod
    def of(cls, raw: dict[int, bytes], *, little_endian: bool = True) -> PrivateTags:
        return cls(raw, private_creators(raw), little_endian)

    def key(self, name: str) -> str | None:
        """The DICOM JSON key ('00291020') of private attribute `name` in this header, or None."""
        spec = private_tag_table()[name]
        block = self.creators.get((spec.group, spec.creator))
        if block is None:
            return None
        return f"{spec.group:04X}{block:02X}{spec.element:02X}"

    def get(self, name: str) -> list[Any] | bytes | None:
        """Values of the private attribute called `name` in data/private_tags.json, or None."""
        if not self.creators:
            return None
        return read_private(self.raw, name, self.creators, little_endian=self.little_endian)
