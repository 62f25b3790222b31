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


def private_creators(ds: Dataset) -> dict[tuple[int, str], int]:
    """(group, creator) -> block number for every private creator element (gggg,0010-00FF) of `ds`."""
    blocks: dict[tuple[int, str], int] = {}
    for base_tag, elem in ds.items():
        tag = int(base_tag)
        group = tag >> 16
        if not group & 1 or not 0x10 <= tag & 0xFFFF <= 0xFF:
            continue
        value = elem.value
        if isinstance(value, bytes):
            creator = value.decode("latin-1").strip(" \x00")
        elif isinstance(value, str):
            creator = value.strip()
        else:
            continue
        blocks[(group, creator)] = tag & 0xFF
    return blocks


def read_private(
    ds: Dataset, name: str, creators: dict[tuple[int, str], int]
) -> list[Any] | bytes | None:
    """The values of private attribute `name`, decoded by the table's VR (bytes for OB/UN), or None."""
    spec = private_tag_table()[name]
    block = creators.get((spec.group, spec.creator))
    if block is None:
        return None
    elem = ds.get_item(spec.group << 16 | block << 8 | spec.element)  # raw: no pydicom conversion
    if elem is None:
        return None
    value = elem.value
    if not isinstance(value, bytes):
        # already converted by pydicom (explicit VR it knew): normalise to a list
        if value is None or value == "":
            return None
        return (
            list(value) if isinstance(value, list | tuple) or hasattr(value, "append") else [value]
        )
    if spec.vr in ("OB", "UN"):
        return value
    if spec.vr in _BINARY_FORMATS:
        fmt = _BINARY_FORMATS[spec.vr]
        size = struct.calcsize("<" + fmt)
        endian = "<" if getattr(elem, "is_little_endian", True) else ">"
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
