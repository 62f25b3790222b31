"""What the gateway refuses, and why; the HTTP layer maps each to its status code."""

from __future__ import annotations


class NotFound(LookupError):
    """No such cohort, job or file (404)."""


class Conflict(RuntimeError):
    """The request clashes with the current state: a duplicate name, a run in progress (409)."""


class Invalid(ValueError):
    """Input that is well-formed JSON but not acceptable, with a message a person can act on (422)."""
