"""What a converter wrote: output files grouped into images, and dcm2niix post-fixes decoded.

dcm2niix names every output `<base><post-fixes>.<ext>`: one stack may give several images (echoes
`_e2`, phase `_ph`, overlays `_ROI1`, resliced `_Eq`, ...). The post-fix vocabulary is kept as data
in `postfixes.json`; `image_tokens` turns `"_e2_ph"` into `{"echo": "2", "part": "phase"}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

FileKind = Literal["nii", "json", "bval", "bvec", "dcm"]

# longest first so that ".nii.gz" wins over ".gz"
_EXTENSIONS: tuple[tuple[str, FileKind], ...] = (
    (".nii.gz", "nii"),
    (".nii", "nii"),
    (".json", "json"),
    (".bval", "bval"),
    (".bvec", "bvec"),
)


@dataclass(frozen=True)
class PostfixRule:
    pattern: re.Pattern[str]
    kind: str
    value: str | None


@lru_cache(maxsize=1)
def load_postfix_rules() -> tuple[PostfixRule, ...]:
    raw = json.loads(resources.files(__package__).joinpath("postfixes.json").read_text("utf-8"))
    return tuple(
        PostfixRule(re.compile(t["pattern"]), t["kind"], t.get("value")) for t in raw["tokens"]
    )


def image_tokens(postfix: str) -> dict[str, str]:
    """Decode a post-fix such as `_e2_ph` into `{"echo": "2", "part": "phase"}`.

    Tokens not in the vocabulary are kept under `"unknown"` (joined with `_`), so nothing is lost.
    """
    tokens: dict[str, str] = {}
    unknown: list[str] = []
    for token in filter(None, postfix.split("_")):
        for rule in load_postfix_rules():
            match = rule.pattern.match(token)
            if match:
                value = (
                    rule.value
                    if rule.value is not None
                    else (match.group(1) if match.groups() else token)
                )
                tokens[rule.kind] = value
                break
        else:
            unknown.append(token)
    if unknown:
        tokens["unknown"] = "_".join(unknown)
    return tokens


@dataclass
class ConvertedImage:
    """One output image and its companions (sidecar, b-values, b-vectors)."""

    postfix: str  # what the converter appended to the base name: "", "_e2", "_e2_ph", ...
    nii: Path
    json: Path | None = None
    bval: Path | None = None
    bvec: Path | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[tuple[FileKind, Path]]:
        """The image's files with their kind, NIfTI first."""
        found: list[tuple[FileKind, Path]] = [("nii", self.nii)]
        for kind in ("json", "bval", "bvec"):
            path = getattr(self, kind)
            if path is not None:
                found.append((kind, path))
        return found


def split_extension(name: str) -> tuple[str, FileKind | None, str]:
    """`("x_e2", "nii", ".nii.gz")` for `"x_e2.nii.gz"`; kind `None` for other files."""
    for ext, kind in _EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], kind, ext
    return name, None, ""


def _natural(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def collect_images(folder: Path, base: str) -> tuple[list[ConvertedImage], list[Path]]:
    """Group the files a converter wrote into `folder` for `base` into images.

    Returns the images in natural post-fix order (`""`, `_e1`, `_e2`, `_e2_ph`, ...) and the files
    that belong to no image (a sidecar without NIfTI, unexpected names).
    """
    stems: dict[str, dict[FileKind, Path]] = {}
    strays: list[Path] = []
    for path in sorted(folder.iterdir()):
        stem, kind, _ = split_extension(path.name)
        if kind is None or not stem.startswith(base):
            strays.append(path)
            continue
        stems.setdefault(stem[len(base) :], {})[kind] = path
    images: list[ConvertedImage] = []
    for postfix in sorted(stems, key=_natural):
        parts = stems[postfix]
        if "nii" not in parts:
            strays.extend(parts.values())
            continue
        tokens = (
            image_tokens(postfix)
            if postfix.startswith("_") or not postfix
            else {"conflict": postfix}
        )
        images.append(
            ConvertedImage(
                postfix=postfix,
                nii=parts["nii"],
                json=parts.get("json"),
                bval=parts.get("bval"),
                bvec=parts.get("bvec"),
                tokens=tokens,
            )
        )
    return images, strays
