"""Date shifting: one offset in whole days per pseudonymous subject (Retain Longitudinal Temporal
Information with Modified Dates, 113107).

Whole days keep every interval and every time of day: a TM never rolls over, a DT keeps its time and
offset suffix, and PatientAge stays right because birth date and study date move together.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, timedelta


def date_offset_days(
    secret: bytes, pseudonym: str, day_range: tuple[int, int] = (-365, -30)
) -> int:
    """The subject's offset in days, from HMAC(secret, pseudonym), uniform in `day_range`, never 0.

    Deterministic, so it is the same for every study of the subject; the service still stores it
    (encrypted) so a later change of range keeps subjects already processed consistent.
    """
    lo, hi = day_range
    if lo > hi:
        raise ValueError("day_range must be (min, max)")
    if not secret:
        raise ValueError("date_offset_days needs the project secret")
    values = [v for v in range(lo, hi + 1) if v != 0]
    if not values:
        raise ValueError("day_range must contain a non-zero number of days")
    digest = hmac.new(secret, b"date-offset:" + pseudonym.encode(), hashlib.sha256).digest()
    return values[int.from_bytes(digest[:8], "big") % len(values)]


def shift_da(value: str, days: int) -> str:
    """Shift a DA (`YYYYMMDD`, also the old `YYYY.MM.DD`); a value that is not a date raises ValueError."""
    text = value.strip().replace(".", "")
    if not text:
        return text
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"not a DICOM date: {value!r}")
    day = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
    return day.strftime("%Y%m%d")


def shift_dt(value: str, days: int) -> str:
    """Shift the date part of a DT (`YYYY[MM[DD[HHMMSS[.F]]]][&ZZXX]`), keeping the rest as written."""
    text = value.strip()
    if len(text) < 8:  # year or year-month only: shift the year-month granularity not meaningful
        raise ValueError(f"DT without a full date cannot be shifted exactly: {value!r}")
    return shift_da(text[:8], days) + text[8:]


def age_string(birth: str, on: str) -> str:
    """PatientAge (AS, e.g. `034Y`) between two DA values, in the unit PS3.5 prefers for the age."""
    b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
    d = date(int(on[:4]), int(on[4:6]), int(on[6:8]))
    days = (d - b).days
    if days < 0:
        raise ValueError("birth date after the study date")
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    if years >= 2:
        return f"{min(years, 999):03d}Y"
    months = (d.year - b.year) * 12 + d.month - b.month - (d.day < b.day)
    if months >= 2:
        return f"{months:03d}M"
    if days >= 14:
        return f"{days // 7:03d}W"
    return f"{days:03d}D"


def timepoint_label(baseline: str, study: str, step_months: int = 6) -> str:
    """`M00`, `M06`, ...: months from the subject's first study (DA) to this one, rounded to the
    nearest `step_months`. Written to ClinicalTrialTimePointID, never into a date attribute."""
    b = date(int(baseline[:4]), int(baseline[4:6]), int(baseline[6:8]))
    s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    months = (s - b).days / 30.4375
    step = max(1, step_months)
    return f"M{max(0, round(months / step) * step):02d}"
