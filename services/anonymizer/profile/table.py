"""PS3.15 Table E.1-1 as data, compiled into a tag -> rule dictionary for one set of options.

The table (`ps3_15_table_e1_1.json`) holds, per attribute, the Basic Profile action and the action of
each option column. Actions: D dummy value, Z zero length, X remove, K keep, C clean (dates: shift;
text: clean), U new UID; compound codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) are resolved with the
attribute's type in the IOD (`attribute_types.json`) so a Type 1 or 2 attribute never just vanishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from services.anonymizer.profile.options import CATEGORIES, ProfileOptions

DATA = Path(__file__).resolve().parent
TABLE_FILE = DATA / "ps3_15_table_e1_1.json"

# option switch -> table column
OPTION_COLUMNS = {
    "retain_uids": "retain_uids",
    "retain_device_identity": "retain_device_identity",
    "retain_institution_identity": "retain_institution_identity",
    "retain_patient_characteristics": "retain_patient_characteristics",
    "clean_descriptors": "clean_descriptors",
    "retain_safe_private": "retain_safe_private",
}

PRIVATE = -1  # pseudo-tag of the "Private Attributes" row


@dataclass(frozen=True, slots=True)
class Rule:
    """The action chosen for one attribute: `action` is one of X Z D K C U; `code` is the table's
    own code for the chosen column (e.g. `X/Z/D`), `category` the user switch that selected it."""

    action: str
    code: str
    keyword: str
    category: str
    identifying: bool  # its original value identifies someone (collected for verification)


@dataclass(frozen=True)
class SafeBlock:
    creator: str
    group: int
    elements: frozenset[int] | None  # None = every element of the block


@dataclass(frozen=True)
class Profile:
    """A compiled profile: what to do with every tag, and what to declare in the output."""

    options: ProfileOptions
    edition: str
    rules: dict[int, Rule]
    private_rule: Rule
    repeating: dict[tuple[int, int], Rule]  # (group mask 0x5000/0x6000, element or -1) -> rule
    safe_private: dict[tuple[int, str], SafeBlock]
    codes: tuple[str, ...]  # CID 7050 codes actually applied
    method: tuple[str, ...]  # DeidentificationMethod values (LO: 64 characters each)

    @cached_property
    def collected_first(self) -> tuple[int, ...]:
        """The tags whose original values are gathered before the walk (`engine._prepare_matcher`):
        identifying attributes the profile does not keep, in the table's order. Worked out once
        per profile, not per file."""
        return tuple(t for t, r in self.rules.items() if r.identifying and r.action != "K")

    def rule_for(self, tag: int) -> Rule | None:
        """The rule of a public tag (including 50xx/60xx repeating groups), None when not listed."""
        rule = self.rules.get(tag)
        if rule is not None:
            return rule
        group = tag >> 16
        if group & 0xFF01 == 0x5000:
            return self.repeating.get((0x5000, -1))
        if group & 0xFF01 == 0x6000:  # an overlay's other attributes follow its data
            rule = self.repeating.get((0x6000, tag & 0xFFFF))
            return rule if rule is not None else self.repeating.get((0x6000, 0x3000))
        return None

    def is_safe_private(self, group: int, creator: str, element_low: int) -> bool:
        block = self.safe_private.get((group, creator.strip().upper()))
        return block is not None and (block.elements is None or element_low in block.elements)


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(TABLE_FILE.read_text(encoding="utf-8"))
    return doc


@lru_cache(maxsize=1)
def _types() -> dict[str, str]:
    doc = json.loads((DATA / "attribute_types.json").read_text(encoding="utf-8"))
    return dict(doc["types"])


@lru_cache(maxsize=1)
def cid7050() -> dict[str, str]:
    """CID 7050 code value -> code meaning."""
    doc = json.loads((DATA / "cid7050.json").read_text(encoding="utf-8"))
    return dict(doc["codes"])


def table_rows() -> list[dict[str, Any]]:
    """The raw rows of Table E.1-1 as stored."""
    return list(_table()["rows"])


def table_edition() -> str:
    return str(_table()["edition"])


def _resolve_compound(code: str, keyword: str) -> str:
    """Pick one action of a compound code from the attribute's IOD type (1 -> D, 2 -> Z, else X)."""
    if "/" not in code:
        return code
    choices = code.replace("*", "").split("/")
    kind = _types().get(keyword, "3")
    if kind == "1":
        for pick in ("U", "D", "Z"):
            if pick in choices:
                return pick
    if kind in ("1", "2"):
        for pick in ("Z", "D", "U"):
            if pick in choices:
                return pick
    return choices[0] if "X" in choices else choices[-1]


def _choose(row: dict[str, Any], opts: ProfileOptions) -> tuple[str, str]:
    """(action, code) for one row under the options; the category switch comes first."""
    category = row["category"]
    if not opts.scrubs(category):
        return "K", "K (category kept)"
    columns = dict(row.get("options") or {})
    enabled = [col for switch, col in OPTION_COLUMNS.items() if getattr(opts, switch)]
    if category == "time_and_date" and opts.shift_dates:
        enabled.append("retain_modified_dates")
    if category == "descriptors" and not opts.clean_descriptors:
        enabled = [c for c in enabled if c != "clean_descriptors"]
    picked = [columns[c] for c in enabled if c in columns]
    if "C" in picked:  # cleaning (shift, clean) is the more protective of two retentions
        return "C", "C"
    if "K" in picked:
        return "K", "K"
    code = row["basic"]
    return _resolve_compound(code, row.get("keyword") or ""), code


def _identifying(category: str) -> bool:
    return category in ("patient", "clinical_trial", "healthcare_provider", "institution", "device")


def _parse_tag(text: str) -> tuple[str, str]:
    return text[1:5], text[6:10]


def _load_safe_private() -> dict[tuple[int, str], SafeBlock]:
    doc = json.loads((DATA / "safe_private.json").read_text(encoding="utf-8"))
    out: dict[tuple[int, str], SafeBlock] = {}
    for block in doc["blocks"]:
        elements = block["elements"]
        group = int(block["group"], 16)
        creator = block["creator"].strip().upper()
        out[(group, creator)] = SafeBlock(
            creator=creator,
            group=group,
            elements=None if elements == "all" else frozenset(int(e, 16) for e in elements),
        )
    return out


def _codes(opts: ProfileOptions) -> tuple[str, ...]:
    """CID 7050 codes of what is really applied; 113100 only when nothing beyond its options is kept."""
    kept = set(CATEGORIES) - opts.categories
    covered = {"time_and_date", "device", "institution"}  # kept by a standard option
    basic = not (kept - covered) and opts.patient_id.strategy != "none"
    codes: list[str] = []
    if basic:
        codes.append("113100")
    if opts.clean_descriptors and opts.scrubs("descriptors"):
        codes.append("113105")
    if "time_and_date" in kept:
        codes.append("113106")
    elif opts.shift_dates:
        codes.append("113107")
    if opts.retain_patient_characteristics and opts.scrubs("patient"):
        codes.append("113108")
    if opts.retain_device_identity or "device" in kept:
        codes.append("113109")
    if opts.retain_uids:
        codes.append("113110")
    if opts.retain_safe_private and opts.scrubs("private"):
        codes.append("113111")
    if opts.retain_institution_identity or "institution" in kept:
        codes.append("113112")
    return tuple(codes)


def _tool_version() -> str:
    try:
        return metadata.version("cohortflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def load_profile(options: ProfileOptions | None = None) -> Profile:
    """Compile Table E.1-1 for `options` into a tag -> `Rule` dictionary (done once per run)."""
    opts = options or ProfileOptions()
    rules: dict[int, Rule] = {}
    repeating: dict[tuple[int, int], Rule] = {}
    private_rule = Rule("X", "X", "", "private", False)
    for row in _table()["rows"]:
        action, code = _choose(row, opts)
        keyword = row.get("keyword") or row["name"]
        rule = Rule(action, code, keyword, row["category"], _identifying(row["category"]))
        if row["tag"] == "private":
            private_rule = rule
            continue
        group, element = _parse_tag(row["tag"])
        if "x" in group.lower():
            mask = int(group[:2], 16) << 8
            repeating[(mask, -1 if "x" in element.lower() else int(element, 16))] = rule
            continue
        rules[int(group + element, 16)] = rule
    codes = _codes(opts)
    meanings = cid7050()
    kept = sorted(set(CATEGORIES) - opts.categories)
    method = [f"Cohortflow {_tool_version()}", f"DICOM PS3.15 {table_edition()} Table E.1-1"]
    method += [meanings[c][:64] for c in codes]
    if kept:
        method.append(("Kept: " + " ".join(kept))[:64])
    return Profile(
        options=opts,
        edition=table_edition(),
        rules=rules,
        private_rule=private_rule,
        repeating=repeating,
        safe_private=_load_safe_private(),
        codes=codes,
        method=tuple(method),
    )
