"""Sealing secrets that travel through events and tables: readable only with the project secret,
never sealed twice, and one key per purpose."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from shared.secrets import (
    SecretError,
    is_sealed,
    project_key,
    redact_config,
    seal,
    seal_config,
    unseal,
)
from shared.settings import Settings

PROJECT = Settings(project_secret=SecretStr("project-a"))
OTHER = Settings(project_secret=SecretStr("project-b"))


def test_a_sealed_value_opens_only_with_its_project_secret() -> None:
    sealed = seal("audit-password", PROJECT)
    assert is_sealed(sealed) and "audit-password" not in sealed
    assert unseal(sealed, PROJECT) == "audit-password"
    assert seal(sealed, PROJECT) == sealed, "sealing twice would make it unopenable"
    with pytest.raises(SecretError, match="cannot be opened"):
        unseal(sealed, OTHER)


def test_an_empty_project_secret_is_refused_not_used() -> None:
    with pytest.raises(SecretError, match="not set"):
        seal("x", Settings(project_secret=SecretStr("")))


def test_keys_differ_by_purpose_and_by_project() -> None:
    keys = {
        project_key("seal", PROJECT),
        project_key("anonymizer:lookup", PROJECT),
        project_key("seal", OTHER),
    }
    assert len(keys) == 3 and all(len(k) == 32 for k in keys)


def test_secret_keys_are_sealed_or_redacted_wherever_they_sit() -> None:
    config = {
        "audit_export": {"format": "csv", "password": "pw"},
        "patient_id": {"strategy": "csv", "csv": "old,new\n123,sub-01"},
        "nested": [{"token": "t"}],
        "workers": 4,
    }
    sealed = seal_config(config, PROJECT)
    assert is_sealed(sealed["audit_export"]["password"])
    assert is_sealed(sealed["patient_id"]["csv"]) and is_sealed(sealed["nested"][0]["token"])
    assert sealed["audit_export"]["format"] == "csv" and sealed["workers"] == 4
    assert unseal(sealed["patient_id"]["csv"], PROJECT) == config["patient_id"]["csv"]  # type: ignore[index]
    shown = redact_config(config)
    assert shown["audit_export"] == {"format": "csv", "password": "***"}
    assert shown["patient_id"]["csv"] == "***" and shown["nested"] == [{"token": "***"}]
