"""The one backoff rule for trying again: double the wait after each failure in a row, up to a cap."""

from __future__ import annotations


def backoff_s(failures: int, first_s: float = 1.0, cap_s: float = 10.0) -> float:
    """Seconds to wait after `failures` failures in a row: `first_s`, twice that, ... `cap_s`."""
    return min(cap_s, first_s * 2.0 ** max(0, failures - 1))
