"""The original identifiers seen while anonymizing, and the searches that find them again.

Values are gathered only from identifying attributes (patient, provider, institution, device, trial
rows of the table), so a one-letter sex or a slice number never becomes a search term. Matching is by
whole value or whole name component, case-insensitive, bounded by non-alphanumerics; UIDs match whole
(bounded by non `[0-9.]`), dates as 8-digit tokens.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.valuerep import PersonName

from shared.subjects import PLACEHOLDER_IDS

# values that name nobody: the placeholders no PatientID may stand on (shared.subjects), and the
# flags every de-identified file carries
NEUTRAL = PLACEHOLDER_IDS | {"", "YES", "NO"}
MIN_LENGTH = 3
_ALNUM = re.compile(r"[^A-Z0-9]")
# a number shorter than this (StudyID 160, PatientID 1234) is in every header as a count, a size or
# an instance number: too generic to search, so it is counted in the audit instead (a device
# serial number such as 66024 is searched)
MIN_NUMBER_LENGTH = 5
MIN_UID_LENGTH = 8


# device and technique attributes the profile keeps whose text can coincide with an identifying
# value without naming anybody: a vendor imaging at its own site (InstitutionName = Manufacturer),
# a station named after its model, a phantom named after its sequence. A hit there is excused only
# as `verify` says; values, UIDs and dates are never excused anywhere else.
EXPLAINING = {
    0x00080070: "Manufacturer",
    0x00081090: "ManufacturerModelName",
    0x00181020: "SoftwareVersions",
    0x00180024: "SequenceName",
    0x00189005: "PulseSequenceName",
    0x00181250: "ReceiveCoilName",
    0x00181251: "TransmitCoilName",
    0x00080102: "CodingSchemeDesignator",
    0x00080100: "CodeValue",
    0x00080104: "CodeMeaning",
    0x00020013: "ImplementationVersionName",  # file meta
}
CREATORS = -1  # the `kept` key of private creator strings (any block, any group)


def is_private_creator(tag: int) -> bool:
    return bool(tag >> 16 & 1) and 0x0010 <= (tag & 0xFFFF) <= 0x00FF


def is_identifier(keyword: str) -> bool:
    """An attribute whose value is an identifier (PatientID, OtherPatientIDs, AccessionNumber,
    DeviceSerialNumber, StudyID...), not a name or a place."""
    return keyword.endswith(("ID", "IDs", "Number", "Numbers"))


@dataclass
class IdentifierSet:
    """Original identifying values, UIDs and dates of one input (merge several for a study)."""

    values: set[str] = field(default_factory=set)  # upper-cased whole values / name components
    uids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)  # YYYYMMDD
    short_values: int = 0  # identifying values too short or generic to search (counted, audited)
    # values of identifier attributes (PatientID, AccessionNumber, serial numbers...): a hit on one
    # of them is never excused as a coincidence
    fixed: set[str] = field(default_factory=set)
    # tag -> the texts a kept device or technique attribute held in the source file: what can
    # explain a hit as a coincidence (see `verify`)
    kept: dict[int, set[str]] = field(default_factory=dict)
    # whole person names (components joined by a space): a technique attribute that holds all of
    # one is never a coincidence
    names: set[str] = field(default_factory=set)

    def add_value(self, value: Any, *, identifier: bool = False) -> None:
        """Add an identifying value (str, PersonName, or a list of them); `identifier` marks the
        value of an ID attribute, which no coincidence can excuse."""
        if value is None:
            return
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            for item in value:
                self.add_value(item, identifier=identifier)
            return
        if isinstance(value, bytes):
            return
        if isinstance(value, PersonName) or "^" in str(value):
            text = str(value)
            parts = [p for group in text.split("=") for p in group.split("^")]
            whole = text.replace("^", " ").strip()
            for i, part in enumerate([whole, *parts]):
                self._add_text(part, identifier, name=i == 0)
            return
        self._add_text(str(value), identifier)

    def _add_text(self, text: str, identifier: bool = False, name: bool = False) -> None:
        norm = " ".join(text.upper().split())
        if norm in NEUTRAL or _ALNUM.sub("", norm) in NEUTRAL:  # "N.A.", "-", "***"
            return
        if len(norm) < MIN_LENGTH or (norm.isdigit() and len(norm) < MIN_NUMBER_LENGTH):
            self.short_values += 1
            return
        self.values.add(norm)
        if identifier:
            self.fixed.add(norm)
        if name:
            self.names.add(norm)

    def add_kept(self, tag: int, value: Any) -> None:
        """Remember what a kept device or technique attribute held in the source file."""
        if value is None or isinstance(value, bytes):
            return
        items = value if isinstance(value, (list, tuple)) else [value]
        if type(value).__name__ == "MultiValue":
            items = list(value)
        text = "\\".join(str(v) for v in items).strip(" \x00")
        if text:
            self.kept.setdefault(tag, set()).add(text.upper())

    def add_uid(self, uid: str) -> None:
        uid = uid.strip().rstrip("\x00")
        if len(uid) >= MIN_UID_LENGTH:
            self.uids.add(uid)
        elif uid:  # "0", "1.2.3": a placeholder, and a digit run of every object key
            self.short_values += 1

    def add_date(self, value: str) -> None:
        text = value.strip().replace(".", "")[:8]
        if len(text) == 8 and text.isdigit():
            self.dates.add(text)

    def merge(self, other: IdentifierSet) -> IdentifierSet:
        self.values |= other.values
        self.uids |= other.uids
        self.dates |= other.dates
        self.short_values += other.short_values
        self.fixed |= other.fixed
        self.names |= other.names
        for tag, texts in other.kept.items():
            self.kept.setdefault(tag, set()).update(texts)
        return self

    def discard(self, values: Iterable[str]) -> None:
        """Drop values that are legitimately in the output (the pseudonym itself)."""
        for value in values:
            norm = " ".join(value.upper().split())
            self.values.discard(norm)
            self.fixed.discard(norm)
            self.names.discard(norm)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """Searches for one IdentifierSet.

    Whole values go through one case-insensitive alternation, compiled once per distinct value set
    (the files of a study share theirs, so a study compiles it about once). UIDs and dates differ
    in every file (the SOP Instance UID), so they are not compiled at all: the text is cut into
    its maximal `[0-9.]` runs and digit runs, and each run is looked up in a set - the same
    boundaries as the patterns in the module docstring.

    Before any pattern runs, plain substring tests (C speed) ask whether the text contains a value
    (case-folded), a UID or a date at all; the patterns, which settle the boundaries, run only
    then. Most text - and all of a vendor blob of 100 KB that names nobody - stops there.
    """

    def __init__(self, ids: IdentifierSet) -> None:
        self.uids = frozenset(ids.uids)
        self.dates = frozenset(ids.dates)
        self.text = _values_pattern(frozenset(ids.values))
        self._folded = tuple({v.casefold() for v in ids.values if v})
        # maximal [0-9.] runs at least as long as the shortest UID (numbers in values are shorter)
        shortest = min((len(u) for u in self.uids), default=1)
        self._uid_runs = _uid_run_pattern(shortest)

    def _may_hold(self, text: str) -> tuple[bool, bool, bool]:
        """(a value, a UID, a date) may occur in `text`: a necessary condition, cheap to test."""
        folded = text.casefold() if self._folded else ""
        return (
            self.text is not None and any(v in folded for v in self._folded),
            any(u in text for u in self.uids),
            any(d in text for d in self.dates),
        )

    def _is_date(self, run: str) -> bool:
        """A digit run that is an original date alone, or opens a DT (date then at least HHMM)."""
        return run[:8] in self.dates and (len(run) == 8 or len(run) >= 12)

    def in_text(self, text: str) -> list[tuple[str, str]]:
        """(kind, matched text) for every hit in `text`."""
        hits: list[tuple[str, str]] = []
        values, uids, dates = self._may_hold(text)
        if values and self.text is not None:
            hits.extend(("value", m.group(1)) for m in self.text.finditer(text))
        if uids:
            hits.extend(("uid", m) for m in self._uid_runs.findall(text) if m in self.uids)
        if dates:  # never inside a longer number: runs start after a non-digit, non-dot
            hits.extend(("date", run[:8]) for run in _DIGIT_RUN.findall(text) if self._is_date(run))
        return hits

    def mask(self, text: str) -> str:
        """`text` with every whole value and date overwritten by X of the same length."""
        values, _, dates = self._may_hold(text)
        if values and self.text is not None:
            text = self.text.sub(lambda m: "X" * len(m.group(0)), text)
        if dates:

            def date(m: re.Match[str]) -> str:
                run = m.group(0)
                return "X" * 8 + run[8:] if self._is_date(run) else run

            text = _DIGIT_RUN.sub(date, text)
        return text


@functools.lru_cache(maxsize=64)
def _uid_run_pattern(shortest: int) -> re.Pattern[str]:
    return re.compile(r"(?<![0-9.])[0-9.]{" + str(shortest) + ",}")


_DIGIT_RUN = re.compile(r"(?<![0-9.])[0-9]{8,}")


@functools.lru_cache(maxsize=256)
def _values_pattern(values: frozenset[str]) -> re.Pattern[str] | None:
    ordered = sorted({v for v in values if v}, key=len, reverse=True)
    if not ordered:
        return None
    alternation = "|".join(re.escape(v) for v in ordered)
    return re.compile(r"(?<![A-Za-z0-9])(" + alternation + r")(?![A-Za-z0-9])", re.I)
