"""Sealing secrets that must travel through events and tables (e.g. the audit password).

A sealed value is `sealed:v1:<Fernet token>`, encrypted with a key derived from the project secret,
so it is never in clear text on the bus or in a table, yet the service that needs it can open it.
Keyed HMACs for pseudonyms and UIDs also derive their keys here, one purpose per key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from shared.settings import Settings, get_settings

SEALED_PREFIX = "sealed:v1:"


class SecretError(ValueError):
    """A sealed value could not be opened (wrong project secret or damaged value)."""


def project_key(purpose: str, settings: Settings | None = None) -> bytes:
    """A 32-byte key for one purpose, derived from the project secret."""
    secret = (settings or get_settings()).project_secret.get_secret_value()
    if not secret:
        raise SecretError("COHORTFLOW_PROJECT_SECRET is not set; refusing to use an empty secret")
    return hmac.new(secret.encode(), f"cohortflow:{purpose}".encode(), hashlib.sha256).digest()


def _fernet(settings: Settings | None) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(project_key("seal", settings)))


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def seal(value: str, settings: Settings | None = None) -> str:
    if is_sealed(value):
        return value
    return SEALED_PREFIX + _fernet(settings).encrypt(value.encode()).decode()


def unseal(value: str, settings: Settings | None = None) -> str:
    if not is_sealed(value):
        raise SecretError("value is not sealed")
    try:
        return _fernet(settings).decrypt(value[len(SEALED_PREFIX) :].encode()).decode()
    except InvalidToken as exc:
        raise SecretError("sealed value cannot be opened with this project secret") from exc


# config keys whose values are secrets wherever they appear in a stage config
# (`csv`: the patient-ID mapping of the csv pseudonym strategy, a table of original IDs)
SECRET_KEYS = frozenset({"password", "audit_password", "secret", "token", "csv"})


def seal_config(config: Any, settings: Settings | None = None) -> Any:
    """A copy of a (nested) config with every secret-named string value sealed."""
    if isinstance(config, dict):
        return {
            k: seal(v, settings)
            if k in SECRET_KEYS and isinstance(v, str)
            else seal_config(v, settings)
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [seal_config(v, settings) for v in config]
    return config


def redact_config(config: Any) -> Any:
    """A copy of a config fit to show or store: secret values replaced by `"***"`."""
    if isinstance(config, dict):
        return {k: "***" if k in SECRET_KEYS else redact_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact_config(v) for v in config]
    return config
