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
    values = element.get("Value")
    if values is not None:
        if element.get("vr") == "PN":
            return [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]
        return values if isinstance(values, list) else [values]
    return _decode_inline(element)


def _fold(dataset: Mapping[str, Any], into: dict[str, list[Any]]) -> None:
    """Fold a functional-group item and its standard sub-sequences into `into`, later wins."""
    for key, element in dataset.items():
        if not isinstance(element, dict):
            continue
        if element.get("vr") == "SQ":
            if _is_private(key):
                continue
            for item in element.get("Value") or ():
                if isinstance(item, dict):
                    _fold(item, into)
            continue
        values = _values(element)
        if values:
            into[key] = values


class Flat:
    """Tag -> values view of one header: functional-group values (Enhanced) over the top level.

    The top level is read in place (no copy); only the two functional-group sequences are folded,
    which keeps a classic header's cost at a dictionary lookup per attribute read.
    """

    __slots__ = ("_groups", "_top")

    def __init__(self, header: Mapping[str, Any]) -> None:
        self._top = header
        self._groups: dict[str, list[Any]] = {}
        for groups_key in (SHARED_GROUPS, PER_FRAME_GROUPS):
            groups = header.get(groups_key)
            items = (groups or {}).get("Value") or []
            if items and isinstance(items[0], dict):
                _fold(items[0], self._groups)

    def get(self, key: str) -> list[Any] | None:
        """Values of tag `key` ('00180081'), None when absent or empty."""
        if self._groups:
            found = self._groups.get(key)
            if found is not None:
                return found
        element = self._top.get(key)
        if element is None or not isinstance(element, dict) or element.get("vr") == "SQ":
            return None
        return _values(element) or None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


def flatten_header(header: Mapping[str, Any]) -> Flat:
    """One tag -> values view for classic and Enhanced objects (see the module docstring)."""
    return Flat(header)


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
