"""BIDS entities: their order, their keys, and how a file name is built from them.

The entity table (`entities.json`) is the specification's `rules.entities` list: the order in which
entities appear in a file name (`sub-`, `ses-`, `task-`, `acq-`, `ce-`, `rec-`, `dir-`, `run-`,
`echo-`, `part-`, ...), each with its short key and value format. A *label* is alphanumeric; an
*index* is a non-negative integer. Names are built from that table only, never from ad-hoc ordering.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import PurePosixPath
from typing import Literal

from shared.vocabulary import ExportLayout as Layout

EntityValue = str | int


@dataclass(frozen=True)
class EntitySpec:
    """One BIDS entity: long `name` (`acquisition`), file-name `key` (`acq`), value `format`."""

    name: str
    key: str
    format: Literal["label", "index"]
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class EntityTable:
    """The ordered entity table of one BIDS version."""

    bids_version: str
    entities: tuple[EntitySpec, ...]

    def spec(self, key_or_name: str) -> EntitySpec:
        """The entity for a short key (`acq`) or a long name (`acquisition`)."""
        for entity in self.entities:
            if key_or_name in (entity.key, entity.name):
                return entity
        raise ValueError(f"unknown BIDS entity {key_or_name!r}")

    def position(self, key: str) -> int:
        return next(i for i, entity in enumerate(self.entities) if entity.key == key)


@lru_cache(maxsize=1)
def load_entity_table() -> EntityTable:
    """The entity table shipped with the package (`entities.json`)."""
    raw = json.loads(resources.files(__package__).joinpath("entities.json").read_text("utf-8"))
    entities = tuple(
        EntitySpec(e["name"], e["key"], e["format"], tuple(e.get("enum", ())))
        for e in raw["entities"]
    )
    return EntityTable(bids_version=raw["bids_version"], entities=entities)


_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")
_SUFFIX = re.compile(r"^[A-Za-z0-9]+$")


def sanitize_label(value: object) -> str:
    """A BIDS label: the value's letters and digits only (accents folded, `+`, `_`, `-`, spaces dropped).

    `"pd+t2_tse sag"` -> `"pdt2tsesag"`, `"Ré-st"` -> `"Rest"`. May return `""`; callers decide
    whether an empty label is an error.
    """
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode("ascii")
    return _NOT_ALNUM.sub("", text)


_SUB_PREFIX = re.compile(r"^sub(?:[-_ ]+|(?=[0-9]))", re.I)


def subject_label(subject_id: str) -> str:
    """The `sub-` label of a catalog subject id: `sanitize_label`, without a `sub` prefix the id
    already carries (`sub-01`, `sub_01`, `sub01` -> `01`), so that no dataset names `sub-sub01`.
    A prefix followed by a letter stays (`Subaru` is a name, not a prefix)."""
    label = sanitize_label(_SUB_PREFIX.sub("", subject_id.strip(), count=1))
    return label or sanitize_label(subject_id)


def format_entity_value(spec: EntitySpec, value: EntityValue) -> str:
    """The value as it appears in a file name; raises `ValueError` when it cannot be one."""
    if spec.format == "index":
        text = str(value).strip()
        if not text.isdigit():
            raise ValueError(f"{spec.key}- needs a non-negative integer index, got {value!r}")
        return str(int(text))
    label = sanitize_label(value)
    if spec.enum and label not in spec.enum:
        raise ValueError(f"{spec.key}- must be one of {', '.join(spec.enum)}, got {value!r}")
    return label


def ordered_entities(entities: Mapping[str, EntityValue | None]) -> list[tuple[str, str]]:
    """`(key, value)` pairs in specification order; `None` and empty labels are left out."""
    table = load_entity_table()
    pairs: list[tuple[int, str, str]] = []
    for key_or_name, value in entities.items():
        if value is None or value == "":
            continue
        spec = table.spec(key_or_name)
        text = format_entity_value(spec, value)
        if text:
            pairs.append((table.position(spec.key), spec.key, text))
    keys = [key for _, key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"an entity is given twice (long and short name?): {sorted(entities)}")
    return [(key, text) for _, key, text in sorted(pairs)]


def bids_name(entities: Mapping[str, EntityValue | None], suffix: str, ext: str = "") -> str:
    """A BIDS file name: `sub-01_ses-1_task-rest_run-1_bold.nii.gz`.

    `entities` may use short keys (`acq`) or long names (`acquisition`), in any order; `sub` is
    required. `ext` is `""` (a base name) or starts with a dot (`.nii.gz`, `.json`).
    """
    if not _SUFFIX.match(suffix):
        raise ValueError(f"a BIDS suffix is alphanumeric, got {suffix!r}")
    if ext and not ext.startswith("."):
        raise ValueError(f"extension must start with a dot, got {ext!r}")
    pairs = ordered_entities(entities)
    if not pairs or pairs[0][0] != "sub":
        raise ValueError("a BIDS name needs a non-empty sub- label")
    return "_".join([*(f"{key}-{value}" for key, value in pairs), suffix]) + ext


def bids_path(
    entities: Mapping[str, EntityValue | None],
    suffix: str,
    ext: str = "",
    *,
    datatype: str,
    layout: Layout = "bids",
) -> PurePosixPath:
    """Where a file sits relative to the dataset root.

    `bids`: `sub-<label>/[ses-<label>/]<datatype>/<name>`; `flat`: `<name>` in one folder.
    """
    name = bids_name(entities, suffix, ext)
    if layout == "flat":
        return PurePosixPath(name)
    if not datatype or not _SUFFIX.match(datatype):
        raise ValueError(f"a BIDS datatype folder is needed for the bids layout, got {datatype!r}")
    pairs = dict(ordered_entities(entities))
    folder = PurePosixPath(f"sub-{pairs['sub']}")
    if "ses" in pairs:
        folder = folder / f"ses-{pairs['ses']}"
    return folder / datatype / name


def parse_bids_name(name: str) -> tuple[dict[str, str], str, str]:
    """Split `sub-01_echo-2_MEGRE.nii.gz` into `({"sub": "01", "echo": "2"}, "MEGRE", ".nii.gz")`."""
    stem, dot, ext = name.partition(".")
    *parts, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("-")
        if not sep:
            raise ValueError(f"not a BIDS name: {name!r}")
        entities[key] = value
    return entities, suffix, dot + ext
