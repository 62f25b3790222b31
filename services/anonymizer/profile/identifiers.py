"""The original identifiers seen while anonymizing, and the searches that find them again.

Values are gathered only from identifying attributes (patient, provider, institution, device, trial
rows of the table), so a one-letter sex or a slice number never becomes a search term. Matching is by
whole value or whole name component, case-insensitive, bounded by non-alphanumerics; UIDs match whole
(bounded by non `[0-9.]`), dates as 8-digit tokens.
"""

from __future__ import annotations

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
    """Compiled searches for one IdentifierSet."""

    def __init__(self, ids: IdentifierSet) -> None:
        self.uids = frozenset(ids.uids)
        self.text = _alternation(ids.values, r"(?<![A-Za-z0-9])(", r")(?![A-Za-z0-9])", re.I)
        self.uid_text = _alternation(ids.uids, r"(?<![0-9.])(", r")(?![0-9.])")
        # a date alone, or starting a DT (date then at least HHMM); never inside a longer number
        self.dates = _alternation(ids.dates, r"(?<![0-9.])(", r")(?:(?![0-9])|(?=[0-9]{4}))")

    def in_text(self, text: str) -> list[tuple[str, str]]:
        """(kind, matched text) for every hit in `text`."""
        hits: list[tuple[str, str]] = []
        for kind, pattern in (("value", self.text), ("uid", self.uid_text), ("date", self.dates)):
            if pattern is not None:
                hits.extend((kind, m.group(1)) for m in pattern.finditer(text))
        return hits


def _alternation(
    items: Iterable[str], head: str, tail: str, flags: int = 0
) -> re.Pattern[str] | None:
    ordered = sorted({i for i in items if i}, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile(head + "|".join(re.escape(i) for i in ordered) + tail, flags)
