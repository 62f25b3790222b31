"""Diffusion b-value and gradient direction of a classic (single-frame) image.

The standard places them in DiffusionBValue (0018,9087) and DiffusionGradientOrientation (0018,9089);
many scanners write them only in private tags: Siemens (0019,100C)/(0019,100E) or, on newer software,
only inside the CSA image header (0029,1010); GE (0043,1039) and (0019,10BB-10BD); Philips (2001,1003)
and (2005,10B0-10B2). The first source that has a value wins, in that order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .private_tags import PrivateTags

# GE adds multiples of 1e9 to the b-value in (0043,1039) on some software versions
GE_B_VALUE_MODULUS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Diffusion:
    b_value: float | None = None
    gradient: tuple[float, ...] = ()
    source: str | None = None  # "standard", "siemens", "siemens-csa", "ge", "philips"


def read_diffusion(
    tags: PrivateTags,
    standard_b: float | None,
    standard_gradient: list[float],
    siemens_csa_wanted: bool,
) -> Diffusion:
    """Find b-value and gradient for one image. `siemens_csa_wanted` allows parsing the CSA header (it
    costs a little, so the caller asks only for Siemens images that look like diffusion)."""
    if standard_b is not None:
        return Diffusion(standard_b, tuple(standard_gradient), "standard")
    siemens_b = _first_number(tags.get("siemens_b_value"))
    if siemens_b is not None:
        gradient = _numbers(tags.get("siemens_gradient"))
        return Diffusion(siemens_b, tuple(gradient), "siemens")
    ge_b = _first_number(tags.get("ge_b_value"))
    if ge_b is not None:
        vector = _vector(tags, ("ge_gradient_x", "ge_gradient_y", "ge_gradient_z"))
        return Diffusion(float(ge_b % GE_B_VALUE_MODULUS), vector, "ge")
    philips_b = _first_number(tags.get("philips_b_value"))
    if philips_b is not None:
        vector = _vector(
            tags, ("philips_gradient_rl", "philips_gradient_ap", "philips_gradient_fh")
        )
        return Diffusion(philips_b, vector, "philips")
    if siemens_csa_wanted:
        return _siemens_csa(tags)
    return Diffusion()


def _siemens_csa(tags: PrivateTags) -> Diffusion:
    blob = tags.get("siemens_csa_image")
    if not isinstance(blob, bytes):
        return Diffusion()
    with warnings.catch_warnings():
        # nibabel warns on import that its DICOM readers are experimental; only its CSA parser is used
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        csa = csareader.read(blob)  # type: ignore[no-untyped-call]  # nibabel has no annotations
    except (csareader.CSAReadError, ValueError, IndexError):
        return Diffusion()
    csa_tags = csa.get("tags", {})
    b_items = csa_tags.get("B_value", {}).get("items") or []
    if not b_items:
        return Diffusion()
    gradient = csa_tags.get("DiffusionGradientDirection", {}).get("items") or []
    return Diffusion(float(b_items[0]), tuple(float(g) for g in gradient[:3]), "siemens-csa")


def _vector(tags: PrivateTags, names: tuple[str, ...]) -> tuple[float, ...]:
    """A gradient stored as one private attribute per component; () unless every component is there."""
    components = [_first_number(tags.get(name)) for name in names]
    return tuple(c for c in components if c is not None) if None not in components else ()


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, int | float)]


def _first_number(values: Any) -> float | None:
    numbers = _numbers(values)
    return numbers[0] if numbers else None
