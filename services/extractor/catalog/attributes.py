"""Filling record fields from a DICOM JSON header, by the table in `data/attributes.json`.

`HeaderView` is the lookup the table is applied to: the top-level attributes of a header and, for
Enhanced multi-frame objects, the attributes of the Shared Functional Groups (5200,9229) macros and of
the first frame's Per-frame Functional Groups (5200,9230) macros, in that order of precedence. That is
how EffectiveEchoTime (0018,9082) or RepetitionTime inside MRTimingAndRelatedParametersSequence reach
the same record fields as their classic counterparts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache, lru_cache
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
        """Field values of `record` ("subject", "study", "instance", "mr", ...) that the header has.

        The hot loop of extraction (about 90 lookups per file, most of them misses): the table is
        compiled once into (field, where to look, converter) and the lookup is inlined here."""
        flat = self.flat
        kwargs: dict[str, Any] = {}
        for name, lookups, converter in _compiled(record):
            for lookup in lookups:
                elem = flat.get(lookup) if isinstance(lookup, str) else self.element(lookup)
                if elem is None:
                    continue
                values = elem.get("Value")
                if values:
                    value = converter(values)
                    if value is not None and value != []:
                        kwargs[name] = value
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
    return _CONVERTERS[kind](values)


def _strs(values: list[Any]) -> list[str]:
    return [v if type(v) is str else _text(v) for v in values]


def _floats(values: list[Any]) -> list[float]:
    out = [_float(v) for v in values]
    return [v for v in out if v is not None]


def _str(values: list[Any]) -> str | None:
    first = values[0]
    if type(first) is str:
        return first or None
    return _text(first) or None


def _first_float(values: list[Any]) -> float | None:
    return _float(values[0])


def _int(values: list[Any]) -> int | None:
    number = _float(values[0])
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
    kind = type(value)
    if kind is float:
        return value if value == value else None
    if kind is int:
        return float(value)
    if value is None or kind is dict:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None


_CONVERTERS: dict[str, Callable[[list[Any]], Any]] = {
    "str": _str,
    "strs": _strs,
    "float": _first_float,
    "floats": _floats,
    "int": _int,
}

# (field, where to look in order: a key of the view, or a path into a sequence; converter)
_Compiled = tuple[tuple[str, tuple[str | tuple[str, ...], ...], Callable[[list[Any]], Any]], ...]


@cache
def _compiled(record: str) -> _Compiled:
    """The rules of `record` in the shape `HeaderView.values` walks."""
    return tuple(
        (
            rule.field,
            tuple(path[0] if len(path) == 1 else path for path in rule.paths),
            _CONVERTERS[rule.kind],
        )
        for rule in attribute_rules()[record]
    )


def record_fields(cls: type) -> set[str]:
    """Field names of a record dataclass (used to check the table against the records)."""
    return {f.name for f in fields(cls)}
