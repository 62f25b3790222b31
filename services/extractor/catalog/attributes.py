"""Filling record fields from a DICOM JSON header, by the table in `data/attributes.json`.

`HeaderView` is the lookup the table is applied to: the top-level attributes of a header and, for
Enhanced multi-frame objects, the attributes of the Shared Functional Groups (5200,9229) macros and of
the first frame's Per-frame Functional Groups (5200,9230) macros, in that order of precedence. That is
how EffectiveEchoTime (0018,9082) or RepetitionTime inside MRTimingAndRelatedParametersSequence reach
the same record fields as their classic counterparts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, TypeVar

from pydicom.datadict import tag_for_keyword

from .header_json import tag_key

SHARED_FUNCTIONAL_GROUPS = "52009229"
PER_FRAME_FUNCTIONAL_GROUPS = "52009230"

ValueKind = Literal["str", "strs", "float", "floats", "int"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AttributeRule:
    """Fill `field` from the first of `paths` that has a value; a path is a chain of JSON tag keys."""

    field: str
    paths: tuple[tuple[str, ...], ...]
    kind: ValueKind


@lru_cache(maxsize=1)
def attribute_rules() -> dict[str, tuple[AttributeRule, ...]]:
    """Load `data/attributes.json` (once): record name -> rules."""
    text = resources.files(__package__).joinpath("data/attributes.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    rules: dict[str, tuple[AttributeRule, ...]] = {}
    for record, table in doc["records"].items():
        built = []
        for name, spec in table.items():
            paths = tuple(
                tuple(_keyword_key(k) for k in keyword.split("/")) for keyword in spec["from"]
            )
            built.append(AttributeRule(name, paths, spec["type"]))
        rules[record] = tuple(built)
    return rules


def _keyword_key(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"data/attributes.json names an unknown DICOM keyword: {keyword}")
    return tag_key(tag)


class HeaderView:
    """Attribute lookup over a DICOM JSON header, looking into functional-group macros when present."""

    __slots__ = ("flat",)

    def __init__(self, header: dict[str, Any]) -> None:
        flat = dict(header)
        for group_key in (SHARED_FUNCTIONAL_GROUPS, PER_FRAME_FUNCTIONAL_GROUPS):
            items = header.get(group_key, {}).get("Value") or []
            if items:
                merge_macros(flat, items[0])
        self.flat = flat

    def element(self, path: tuple[str, ...]) -> dict[str, Any] | None:
        elem = self.flat.get(path[0])
        for key in path[1:]:
            items = elem.get("Value") if elem else None
            if not items or not isinstance(items[0], dict):
                return None
            elem = items[0].get(key)
        return elem

    def get(self, path: tuple[str, ...], kind: ValueKind) -> Any:
        elem = self.element(path)
        values = elem.get("Value") if elem else None
        return convert(values, kind) if values else None

    def values(self, record: str) -> dict[str, Any]:
        """Field values of `record` ("subject", "study", "instance", "mr", ...) that the header has."""
        kwargs: dict[str, Any] = {}
        for rule in attribute_rules()[record]:
            for path in rule.paths:
                value = self.get(path, rule.kind)
                if value is not None and value != []:
                    kwargs[rule.field] = value
                    break
        return kwargs

    def fill(self, cls: type[T], record: str) -> T:
        """Build a `cls` record from the rules of `record`."""
        return cls(**self.values(record))


def merge_macros(
    target: dict[str, Any], group_item: dict[str, Any], *, override: bool = False
) -> None:
    """Copy the attributes of each macro (a one-item sequence) of a functional-groups item into `target`."""
    for macro in group_item.values():
        items = macro.get("Value") if macro.get("vr") == "SQ" else None
        if not items or not isinstance(items[0], dict):
            continue
        for key, elem in items[0].items():
            if override or key not in target:
                target[key] = elem


def convert(values: list[Any], kind: ValueKind) -> Any:
    """DICOM JSON `Value` list -> a plain field value of `kind`; unusable values become None."""
    if kind == "strs":
        return [_text(v) for v in values]
    if kind == "floats":
        out = [_float(v) for v in values]
        return [v for v in out if v is not None]
    first = values[0]
    if kind == "str":
        return _text(first) or None
    if kind == "float":
        return _float(first)
    number = _float(first)
    return int(number) if number is not None else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # PN
        return str(value.get("Alphabetic", ""))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, dict):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None


def record_fields(cls: type) -> set[str]:
    """Field names of a record dataclass (used to check the table against the records)."""
    return {f.name for f in fields(cls)}
