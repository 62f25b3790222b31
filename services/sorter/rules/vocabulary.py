"""The fixed DICOM vocabulary the fingerprint needs: vendors, SOP classes, private tags, text words.

All of it is data (`rules/data/*.yaml`), loaded once. It changes rarely and independently of the rule
packs; its version is part of `FINGERPRINT_VERSION` so stored fingerprints are rebuilt when it moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.sorter.rules.header import tag_key

_DATA = "services.sorter.rules.data"


def _load(name: str) -> dict[str, Any]:
    text = resources.files(_DATA).joinpath(name).read_text(encoding="utf-8")
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: expected a mapping at the top level")
    return loaded


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VendorNames(_Strict):
    names: list[str] = Field(default_factory=list)
    words: list[str] = Field(default_factory=list)


class ManufacturersFile(_Strict):
    version: int
    vendors: dict[str, VendorNames]


class SopClassesFile(_Strict):
    version: int
    classes: dict[str, str]
    modalities: dict[str, str]


class PrivateTag(_Strict):
    vendor: str
    tag: str
    note: str = ""


class PrivateTagsFile(_Strict):
    version: int
    tags: dict[str, list[PrivateTag]]


class TextFile(_Strict):
    version: int
    phrases: dict[str, str]
    synonyms: dict[str, list[str]]


_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalize_name(text: str) -> str:
    """Lower-case, punctuation to single spaces: 'G.E. Medical Systems' -> 'g e medical systems'."""
    return " ".join(_NON_WORD.split(text.lower())).strip()


@dataclass(frozen=True, slots=True)
class Vocabulary:
    version: str
    vendor_by_name: dict[str, str]
    vendor_by_word: dict[str, str]
    sop_kinds: dict[str, str]
    modality_kinds: dict[str, str]
    private: dict[str, list[tuple[str, str]]]  # meaning -> [(vendor, tag key)]
    phrase_pattern: re.Pattern[str] | None
    phrases: dict[str, str]
    synonyms: dict[str, tuple[str, ...]]

    def vendor(self, manufacturer: str) -> str:
        """Normalized vendor of a Manufacturer (0008,0070) value, or 'unknown'.

        Whole names first, then whole words: 'SIEMENS', 'Siemens Healthineers' -> siemens;
        'GE MEDICAL SYSTEMS' -> ge; 'Philips Medical Systems' -> philips; 'TOSHIBA_MEC' -> canon.
        """
        name = normalize_name(manufacturer)
        if not name:
            return "unknown"
        found = self.vendor_by_name.get(name)
        if found:
            return found
        for word in name.split():
            found = self.vendor_by_word.get(word)
            if found:
                return found
        return "unknown"


def _phrase_regex(phrases: dict[str, str]) -> re.Pattern[str] | None:
    if not phrases:
        return None
    parts = []
    for phrase in sorted(phrases, key=len, reverse=True):
        body = re.escape(phrase)
        # a phrase that starts/ends with a letter or digit must start/end on a word boundary
        head = r"(?<![a-z0-9])" if phrase[0].isalnum() else ""
        tail = r"(?![a-z0-9])" if phrase[-1].isalnum() else ""
        parts.append(f"{head}{body}{tail}")
    return re.compile("|".join(parts), re.IGNORECASE)


@cache
def vocabulary() -> Vocabulary:
    """The DICOM vocabulary, validated against its schema, loaded once per process."""
    manufacturers = ManufacturersFile.model_validate(_load("manufacturers.yaml"))
    sop = SopClassesFile.model_validate(_load("sop_classes.yaml"))
    private = PrivateTagsFile.model_validate(_load("private_tags.yaml"))
    text = TextFile.model_validate(_load("text.yaml"))
    by_name: dict[str, str] = {}
    by_word: dict[str, str] = {}
    for vendor, names in manufacturers.vendors.items():
        for name in names.names:
            by_name[normalize_name(name)] = vendor
        for word in names.words:
            by_word[normalize_name(word)] = vendor
    version = f"m{manufacturers.version}.s{sop.version}.p{private.version}.t{text.version}"
    return Vocabulary(
        version=version,
        vendor_by_name=by_name,
        vendor_by_word=by_word,
        sop_kinds=dict(sop.classes),
        modality_kinds=dict(sop.modalities),
        private={
            meaning: [(t.vendor, tag_key(t.tag)) for t in tags]
            for meaning, tags in private.tags.items()
        },
        phrase_pattern=_phrase_regex(text.phrases),
        phrases=dict(text.phrases),
        synonyms={word: tuple(canon) for word, canon in text.synonyms.items()},
    )
