"""Consistent replacement UIDs: HMAC(project secret, original UID) rendered as a `2.25.` UID.

PS3.5 B.2 lets a UID be `2.25.` followed by the decimal value of a UUID; the 128 HMAC bits are shaped
as an RFC 9562 version-8 (custom) UUID, so the result is a valid UID of at most 44 characters, the same
for the same original in every file, run and cohort of a project, and irreversible without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from pydicom.uid import UID_dictionary

# a dotted-decimal run that is a UID (inside free text or binary vendor headers)
UID_PATTERN = re.compile(rb"(?<![0-9.])[0-2](?:\.(?:0|[1-9][0-9]*)){4,}(?![0-9.])")


def new_uid(secret: bytes, original: str) -> str:
    """The replacement of `original` under `secret` (deterministic, `2.25.<uuid-v8 as int>`)."""
    if not secret:
        raise ValueError("new_uid needs the project secret (settings.project_secret)")
    digest = bytearray(
        hmac.new(secret, b"uid:" + original.strip().encode(), hashlib.sha256).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC variant
    return "2.25." + str(int.from_bytes(digest, "big"))


def is_well_known(uid: str) -> bool:
    """True for UIDs the standard defines (SOP classes, transfer syntaxes, coding schemes...):
    they name a kind of thing, not a patient's object, and are kept."""
    return uid.strip() in UID_dictionary


def same_length_uid(secret: bytes, original: bytes) -> bytes:
    """A replacement of the same byte length, for UIDs embedded in binary vendor headers (Siemens CSA)
    whose item lengths must not change: the digits of `new_uid`, cut or padded to fit."""
    fresh = new_uid(secret, original.decode("ascii")).encode()
    if len(fresh) >= len(original):
        cut = fresh[: len(original)]
        return cut[:-1] + b"1" if cut.endswith(b".") else cut
    body = fresh + b"." + b"1" * max(0, len(original) - len(fresh) - 1)
    return body[: len(original)]
