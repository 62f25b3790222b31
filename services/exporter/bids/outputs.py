"""Naming the several images one stack can convert into (echoes, phase, field map + magnitude).

A stack usually gives one image, named with the stack's base name. When the converter splits it
(`_e1`/`_e2`, `_ph`, `_fieldmaphz`, ...), each image gets the stack's name plus the entity that tells
it apart (`echo-`, `part-`), or the BIDS suffix its role has (`fieldmap` + `magnitude`,
`magnitude1` + `magnitude2`). Images that are never data (overlays, Philips' appended ADC volume)
and the un-resampled twin of a resliced image are dropped; what cannot be told apart is dropped too
and reported, never written under a clashing name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.exporter.bids.entities import bids_name, parse_bids_name
from services.exporter.bids.plan import load_naming_rules

_MAGNITUDE_SUFFIXES = frozenset({"magnitude", "magnitude1", "magnitude2"})


def _image_part(tokens: Mapping[str, str]) -> str:
    return "fieldmap" if "fieldmap" in tokens else tokens.get("part", "mag")


def _stack_part(constants: Mapping[str, object]) -> str | None:
    value = constants.get("PART")
    if value is None:
        return None
    text = str(value).upper()
    if text == "B0MAP":
        return "fieldmap"
    split = next(s for s in load_naming_rules().series_splits if s["entity"] == "part")
    part: str | None = split["values"].get(text)
    return part


def images_of_stack(
    images: Sequence[Mapping[str, str]], constants: Mapping[str, object]
) -> list[bool]:
    """Which converted images belong to the stack, when its files hold other stacks too.

    An enhanced multi-frame file can carry several stacks (a Philips B0 map: magnitude frames and
    field-map frames); converting it for one stack gives every image. The stack's constants
    (`PART` M/P/R/I/B0MAP, `ECHO`) pick its own; when they pick none, all images are kept.
    """
    if len(images) < 2:
        return [True] * len(images)
    part, echo = _stack_part(constants), constants.get("ECHO")
    keep = []
    for tokens in images:
        ok = part is None or _image_part(tokens) == part
        if echo is not None and "echo" in tokens:
            ok = ok and tokens["echo"] == str(echo)
        keep.append(ok)
    return keep if any(keep) else [True] * len(images)


@dataclass(frozen=True)
class OutputName:
    """The base path an image gets, or `None` with the reason it is not exported."""

    base: PurePosixPath | None
    reason: str = ""


def name_outputs(base: PurePosixPath, images: Sequence[Mapping[str, str]]) -> list[OutputName]:
    """One `OutputName` per image (given as its decoded post-fix tokens), in the same order.

    `base` is the stack's planned base path (`.../sub-01_ses-1_MEGRE`, no extension).
    """
    entities, suffix, _ = parse_bids_name(base.name)
    names: list[OutputName | None] = [None] * len(images)
    live: list[int] = []
    resampled = any("resampled" in tokens for tokens in images)
    for index, tokens in enumerate(images):
        if "discard" in tokens:
            names[index] = OutputName(
                None, "not image data (overlay, derived volume, raw/presentation object)"
            )
        elif resampled and "resampled" not in tokens:
            names[index] = OutputName(None, "superseded by its resliced twin (_Eq/_Tilt)")
        else:
            live.append(index)
    if len(live) == 1:
        names[live[0]] = OutputName(base)
        return [n for n in names if n is not None]

    has_part = any("part" in images[i] for i in live)
    taken: set[str] = set()
    for index in live:
        tokens = images[index]
        own = dict(entities)
        own_suffix = suffix
        if suffix == "fieldmap":  # a B0 map in Hz and its magnitude: the suffix tells them apart
            own_suffix = "fieldmap" if "fieldmap" in tokens else "magnitude"
        elif (
            suffix in _MAGNITUDE_SUFFIXES
            and tokens.get("echo") in ("1", "2")
            and "part" not in tokens
        ):
            own_suffix = f"magnitude{tokens['echo']}"
        elif "echo" in tokens and "echo" not in entities:
            own["echo"] = tokens["echo"]
        if "part" not in entities and has_part:
            own["part"] = tokens.get("part", "mag")
        name = bids_name(own, own_suffix)
        if name in taken:
            names[index] = OutputName(
                None, f"cannot be told apart from another image (post-fix tokens {dict(tokens)})"
            )
            continue
        taken.add(name)
        names[index] = OutputName(base.with_name(name))
    return [n for n in names if n is not None]
