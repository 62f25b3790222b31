"""Secrets in stage configs (the audit export password) travel sealed, never in clear.

The gateway never stores a secret: not in its tables, not in its outbox, not in Kafka. It seals the
value with a key derived from the project secret (`COHORTFLOW_PROJECT_SECRET`, which the stage
services share) and puts only the sealed token in the stage request event; the stage service unseals
it with `unseal`. The token is Fernet (AES-128-CBC + HMAC-SHA256), so it is also tamper-evident.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"cohortflow/stage-config-secrets/v1"


class SealingError(RuntimeError):
    """No project secret to seal with, or a token that does not open with it."""


def _fernet(project_secret: str) -> Fernet:
    if not project_secret:
        raise SealingError(
            "COHORTFLOW_PROJECT_SECRET is not set: secrets cannot be passed to stages safely"
        )
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        project_secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def seal(value: str, project_secret: str) -> str:
    """An opaque token that only holders of the project secret can open."""
    return _fernet(project_secret).encrypt(value.encode()).decode()


def unseal(token: str, project_secret: str) -> str:
    """The clear value of a token made by `seal` with the same project secret."""
    try:
        return _fernet(project_secret).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SealingError("the sealed secret does not open with this project secret") from exc
