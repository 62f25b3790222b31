"""Where a cohort's DICOM may come from, and where an export may be copied to.

A location is either an `s3://bucket/prefix` URI or a local path inside one of the configured data
roots (`COHORTFLOW_DATA_ROOTS`). Local paths are resolved (symlinks and `..` included) before the
check, so nothing escapes a root. Anything else is refused with a message that says what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# bucket names as S3 defines them: 3-63 lower-case letters, digits, dots and hyphens
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


class LocationError(ValueError):
    """A source or destination the gateway refuses; the message tells the user what is allowed."""


def _allowed(roots: Sequence[Path]) -> str:
    if not roots:
        return (
            "no local data roots are configured (COHORTFLOW_DATA_ROOTS), so only s3:// is allowed"
        )
    return "allowed: s3://bucket/prefix or a folder under " + ", ".join(str(r) for r in roots)


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def normalize_location(raw: str, roots: Sequence[Path], *, must_exist: bool = True) -> str:
    """The location in canonical form (`s3://...` as given, local paths resolved and absolute).

    `must_exist` (sources) requires an existing directory; destinations may not exist yet, but the
    folder they would be created in must already be inside a root.
    """
    value = raw.strip()
    if not value:
        raise LocationError("location is empty; " + _allowed(roots))
    if value.startswith("s3://"):
        match = _S3_URI.match(value)
        if match is None:
            raise LocationError(f"{value!r} is not a valid s3://bucket/prefix URI")
        prefix = match.group("prefix") or ""
        if any(part in (".", "..") for part in prefix.split("/")):
            raise LocationError(f"{value!r}: '.' and '..' are not allowed in an S3 prefix")
        return value
    if "://" in value:
        raise LocationError(f"{value!r}: unsupported scheme; " + _allowed(roots))
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise LocationError(f"{value!r} is not an absolute path; " + _allowed(roots))
    resolved_roots = [root.expanduser().resolve() for root in roots]
    resolved = path.resolve()
    if not _within(resolved, resolved_roots):
        raise LocationError(f"{value!r} is outside the allowed data roots; " + _allowed(roots))
    if must_exist and not resolved.is_dir():
        what = "is not a directory" if resolved.exists() else "does not exist"
        raise LocationError(f"{value!r} {what}")
    return str(resolved)
