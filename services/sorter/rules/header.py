"""Read values out of a stack's DICOM JSON header (PS3.18 F.2, as `Dataset.to_json_dict` writes it).

The extractor keeps, per stack, the JSON of one representative instance. For Enhanced multi-frame
objects the acquisition attributes live inside functional-group macros: the Shared Functional Groups
Sequence (5200,9229) holds what every frame shares and the first item of the Per-frame Functional
Groups Sequence (5200,9230) what the representative frame has. `flatten_header` folds all of it into
one tag -> values map (top level < shared groups < per-frame group, so the most specific value wins),
skipping the contents of private sequences, whose nested copies of classic attributes (Philips keeps a
whole classic MR header in (2005,140F)) would otherwise shadow the standard ones.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pydicom.datadict import tag_for_keyword

SHARED_GROUPS = "52009229"
PER_FRAME_GROUPS = "52009230"

Flat = dict[str, list[Any]]


def tag_key(keyword_or_tag: str) -> str:
    """'EchoTime' or '0018,0081' -> '00180081' (the key DICOM JSON uses)."""
    if "," in keyword_or_tag:
        group, element = keyword_or_tag.split(",")
        return f"{group.strip()}{element.strip()}".upper()
    tag = tag_for_keyword(keyword_or_tag)
    if tag is None:
        raise KeyError(f"unknown DICOM keyword {keyword_or_tag!r}")
    return f"{tag:08X}"


def _is_private(key: str) -> bool:
    return int(key[3], 16) % 2 == 1


def _decode_inline(element: Mapping[str, Any]) -> list[Any]:
    """Values of an element whose VR was unknown ('UN' + InlineBinary): implicit-VR private tags.

    Vendor private numbers (Siemens B_value, Philips b-factor as text) arrive this way; decode the
    bytes as backslash-separated ASCII when they look like text, else give up (empty list).
    """
    raw = element.get("InlineBinary")
    if not raw:
        return []
    data = base64.b64decode(raw)
    try:
        text = data.decode("ascii").strip("\x00 ")
    except UnicodeDecodeError:
        return []
    if not text.isprintable():
        return []
    return [part.strip() for part in text.split("\\")]


def _values(element: Mapping[str, Any]) -> list[Any]:
    if "Value" in element:
        values = element["Value"]
        if element.get("vr") == "PN":
            return [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]
        return list(values)
    return _decode_inline(element)


def _fold(dataset: Mapping[str, Any], into: Flat, depth: int) -> None:
    """Fold a dataset (and, below the top, its standard sequences) into `into`, later wins."""
    for key, element in dataset.items():
        if not isinstance(element, Mapping):
            continue
        if element.get("vr") == "SQ":
            if depth == 0 or _is_private(key):
                continue
            for item in element.get("Value") or []:
                if isinstance(item, Mapping):
                    _fold(item, into, depth + 1)
            continue
        values = _values(element)
        if values:
            into[key] = values


def flatten_header(header: Mapping[str, Any]) -> Flat:
    """One tag -> values map for classic and Enhanced objects (see the module docstring)."""
    flat: Flat = {}
    _fold(header, flat, 0)
    for groups_key in (SHARED_GROUPS, PER_FRAME_GROUPS):
        groups = header.get(groups_key)
        items = (groups or {}).get("Value") or []
        if items and isinstance(items[0], Mapping):
            _fold(items[0], flat, 1)
    return flat


def first_str(flat: Flat, key: str) -> str:
    values = flat.get(key)
    if not values or values[0] is None:
        return ""
    return str(values[0]).strip()


def all_str(flat: Flat, key: str) -> list[str]:
    return [str(v).strip() for v in flat.get(key) or [] if v is not None and str(v).strip()]


def to_float(value: Any) -> float | None:
    """A DS/IS/FD value (or a numeric string) as float; None when absent or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def first_float(flat: Flat, key: str) -> float | None:
    values = flat.get(key)
    if not values:
        return None
    return to_float(values[0])


def all_float(flat: Flat, key: str) -> list[float]:
    out = []
    for v in flat.get(key) or []:
        number = to_float(v)
        if number is not None:
            out.append(number)
    return out
