"""Which SOP classes are images, from the table in `data/sop_classes.json`.

The SOP Class UID (0008,0016) says what kind of object a file holds. Images (MR, CT, PET, their
Enhanced multi-frame forms, secondary captures, ...) are catalogued; everything else (presentation
states, structured reports, raw data, DICOMDIR, vendor private objects) is recorded as a rejection that
names the class, so nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from pydicom.uid import UID

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True, slots=True)
class SopClass:
    """A SOP class as the extractor sees it."""

    uid: str
    name: str
    is_image: bool
    functional_groups: (
        bool  # per-frame values in the Functional Groups Sequences (Enhanced objects)
    )


@dataclass(frozen=True, slots=True)
class SopClassTable:
    version: int
    image: dict[str, SopClass]
    non_image_names: dict[str, str]

    def lookup(self, uid: str) -> SopClass:
        """The class for `uid`; unknown UIDs are non-image, named by pydicom's dictionary or by the UID."""
        known = self.image.get(uid)
        if known is not None:
            return known
        name = self.non_image_names.get(uid)
        if name is None:
            name = UID(uid).name if uid else "no SOP Class UID"
        return SopClass(uid=uid, name=name, is_image=False, functional_groups=False)


@lru_cache(maxsize=1)
def sop_class_table() -> SopClassTable:
    """Load `data/sop_classes.json` (once)."""
    text = (
        resources.files(__package__).joinpath("data/sop_classes.json").read_text(encoding="utf-8")
    )
    doc = json.loads(text)
    image = {
        row["uid"]: SopClass(row["uid"], row["name"], True, bool(row["functional_groups"]))
        for row in doc["image"]
    }
    return SopClassTable(
        version=int(doc["version"]), image=image, non_image_names=dict(doc["non_image_names"])
    )
