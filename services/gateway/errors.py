"""What the gateway refuses, and why; the HTTP layer maps each to its status code."""

from __future__ import annotations


class NotFound(LookupError):
    """No such cohort, job or file (404)."""


class Conflict(RuntimeError):
    """The request clashes with the current state: a duplicate name, a run in progress (409)."""


class Invalid(ValueError):
    """Input that is well-formed JSON but not acceptable, with a message a person can act on (422)."""


class Unavailable(RuntimeError):
    """A server the request needs (Postgres, the broker, object storage) does not answer now; the
    client should retry after `retry_after` seconds (503 with `Retry-After`)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after
