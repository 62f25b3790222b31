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

# values that name nobody and appear in every de-identified file (placeholders)
NEUTRAL = frozenset(
    {
        "",
        "ANONYMIZED",
        "ANONYMOUS",
        "ANON",
        "UNKNOWN",
        "NONE",
        "N/A",
        "NA",
        "NULL",
        "REMOVED",
        "YES",
        "NO",
    }
)
MIN_LENGTH = 3


@dataclass
class IdentifierSet:
    """Original identifying values, UIDs and dates of one input (merge several for a study)."""

    values: set[str] = field(default_factory=set)  # upper-cased whole values / name components
    uids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)  # YYYYMMDD
    short_values: int = 0  # identifying values too short to search without false positives

    def add_value(self, value: Any) -> None:
        """Add an identifying value (str, PersonName, or a list of them)."""
        if value is None:
            return
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            for item in value:
                self.add_value(item)
            return
        if isinstance(value, bytes):
            return
        if isinstance(value, PersonName) or "^" in str(value):
            text = str(value)
            parts = [p for group in text.split("=") for p in group.split("^")]
            for part in [text.replace("^", " ").strip(), *parts]:
                self._add_text(part)
            return
        self._add_text(str(value))

    def _add_text(self, text: str) -> None:
        norm = " ".join(text.upper().split())
        if norm in NEUTRAL:
            return
        if len(norm) < MIN_LENGTH:
            self.short_values += 1
            return
        self.values.add(norm)

    def add_uid(self, uid: str) -> None:
        uid = uid.strip().rstrip("\x00")
        if uid:
            self.uids.add(uid)

    def add_date(self, value: str) -> None:
        text = value.strip().replace(".", "")[:8]
        if len(text) == 8 and text.isdigit():
            self.dates.add(text)

    def merge(self, other: IdentifierSet) -> IdentifierSet:
        self.values |= other.values
        self.uids |= other.uids
        self.dates |= other.dates
        self.short_values += other.short_values
        return self

    def discard(self, values: Iterable[str]) -> None:
        """Drop values that are legitimately in the output (the pseudonym itself)."""
        for value in values:
            self.values.discard(" ".join(value.upper().split()))

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
