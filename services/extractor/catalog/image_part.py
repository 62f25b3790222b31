"""The image component of a frame (the PART of a stack key), from the table in `data/image_parts.json`.

One series can hold magnitude and phase images, or a field map beside its magnitude image, or raw
diffusion images beside derived trace maps. PART separates them: M, P, R, I for the complex components,
or a derived-map label (ADC, TRACEW, B0MAP, ...).

Evidence, strongest first: a derived-map token in ImageType/FrameType values 3+; Enhanced
ComplexImageComponent (0008,9208); vendor private image types (GE (0043,102F), GE B0-map series split by
(0043,1030), Philips (2005,1011)); a complex-component token in ImageType values 3+.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True, slots=True)
class ImagePartTable:
    derived_map_tokens: dict[str, str]
    complex_tokens: dict[str, str]
    complex_image_component: dict[str, str]
    ge_image_type: dict[int, str]
    ge_b0map_sequences: tuple[
        str, ...
    ]  # GE pulse sequence names containing one of these are B0 maps
    ge_b0map_vas_collapse: dict[int, str]
    default_mr_part: str


@lru_cache(maxsize=1)
def image_part_table() -> ImagePartTable:
    """Load `data/image_parts.json` (once)."""
    doc = json.loads(
        resources.files(__package__).joinpath("data/image_parts.json").read_text(encoding="utf-8")
    )
    return ImagePartTable(
        derived_map_tokens=dict(doc["derived_map_tokens"]),
        complex_tokens=dict(doc["complex_tokens"]),
        complex_image_component=dict(doc["complex_image_component"]),
        ge_image_type={int(k): v for k, v in doc["ge_image_type"].items()},
        ge_b0map_sequences=tuple(s.lower() for s in doc["ge_b0map"]["pulse_sequence_contains"]),
        ge_b0map_vas_collapse={int(k): v for k, v in doc["ge_b0map"]["vas_collapse_part"].items()},
        default_mr_part=str(doc["default_mr_part"]),
    )


@dataclass(frozen=True, slots=True)
class VendorImageHints:
    """Private image-type evidence read once per file (see data/private_tags.json)."""

    ge_image_type: int | None = None
    ge_pulse_sequence: str | None = None
    ge_vas_collapse: int | None = None
    philips_image_type: str | None = None


def image_part(
    image_type: list[str],
    complex_component: str | None,
    hints: VendorImageHints,
    modality: str | None,
) -> str | None:
    """The PART label of an image, or None when the modality has no such notion (CT, PET, ...)."""
    table = image_part_table()
    tokens = [t.upper() for t in image_type[2:] if t]
    for token in tokens:
        part = table.derived_map_tokens.get(token)
        if part is not None:
            return part
    if complex_component:
        part = table.complex_image_component.get(complex_component.upper())
        if part is not None:
            return part
    if modality != "MR":
        return None
    if (
        hints.ge_pulse_sequence is not None
        and any(name in hints.ge_pulse_sequence.lower() for name in table.ge_b0map_sequences)
        and hints.ge_vas_collapse in table.ge_b0map_vas_collapse
    ):
        return table.ge_b0map_vas_collapse[hints.ge_vas_collapse]
    if hints.ge_image_type in table.ge_image_type:
        return table.ge_image_type[hints.ge_image_type]
    if hints.philips_image_type:
        key = hints.philips_image_type.upper()
        part = table.derived_map_tokens.get(key) or table.complex_tokens.get(key)
        if part is not None:
            return part
    for token in tokens:
        part = table.complex_tokens.get(token)
        if part is not None:
            return part
    return table.default_mr_part
