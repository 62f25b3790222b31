"""Clean Descriptors (113105): keep what a description says about the acquisition, drop what it
says about a person.

SeriesDescription, ProtocolName, StudyDescription and comments are free text that sorting reads as
(weak) evidence; the Basic Profile removes them. Cleaning removes the identifying values gathered from
the same file (names, IDs, institution), dates, long digit runs (record numbers), e-mail addresses
and phone numbers, and keeps the rest ("t1_mprage_sag_p2", "DTI 64dir").
"""

from __future__ import annotations

import re

from services.anonymizer.profile.identifiers import Matcher

PATTERNS = [
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # e-mail
    re.compile(r"(?<!\d)(?:19|20)\d{2}[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])(?!\d)"),
    re.compile(r"(?<!\d)(?:0[1-9]|[12]\d|3[01])[-/.](?:0[1-9]|1[0-2])[-/.](?:19|20)?\d{2}(?!\d)"),
    re.compile(r"\+?\(?\d{2,4}\)?[-. ]\d{3,4}[-. ]\d{3,4}"),  # phone
    re.compile(r"(?<![\d.])\d{6,}(?![\d.])"),  # record numbers
]


def clean_text(text: str, matcher: Matcher | None) -> str:
    """`text` without identifying values, dates, numbers that look like IDs, e-mails and phones."""
    out = text
    for pattern in PATTERNS:
        out = pattern.sub(" ", out)
    if matcher is not None and matcher.text is not None:
        out = matcher.text.sub(" ", out)
    return re.sub(r"\s{2,}", " ", out).strip(" _-^")
