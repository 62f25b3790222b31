"""The local stack's stored settings: created once, differences found, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohortflow.stack.settings import (
    SettingsError,
    StackSettings,
    fields,
    masked,
    requested_from,
)

HOME = Path("/home/someone")


def create(**requested: str) -> StackSettings:
    return StackSettings.create(
        requested, home_dir=HOME, generated_secret=lambda name: f"generated-{name}"
    )


def test_defaults_are_safe_and_complete() -> None:
    stored = create()
    assert stored.values["COHORTFLOW_DATA_ROOTS"] == str(HOME)  # not "/"
    assert stored.values["COHORTFLOW_API_TOKEN"] == ""
    assert stored.values["COHORTFLOW_PROJECT_SECRET"] == "generated-project_secret"
    assert set(stored.values) == {f"COHORTFLOW_{f.upper()}" for f in fields()}
    assert "COHORTFLOW_GATEWAY_PORT" not in stored.values  # the launcher decides ports


def test_first_values_come_from_the_request_then_an_older_stack() -> None:
    stored = StackSettings.create(
        {"COHORTFLOW_API_TOKEN": "tok"},
        home_dir=HOME,
        generated_secret=lambda name: "never",
        legacy={"COHORTFLOW_PROJECT_SECRET": "old-secret", "COHORTFLOW_DATA_ROOTS": "/data"},
    )
    assert stored.values["COHORTFLOW_API_TOKEN"] == "tok"
    assert stored.values["COHORTFLOW_PROJECT_SECRET"] == "old-secret"
    assert stored.values["COHORTFLOW_DATA_ROOTS"] == "/data"


def test_an_older_stacks_default_roots_do_not_keep_slash() -> None:
    stored = StackSettings.create(
        {},
        home_dir=HOME,
        generated_secret=lambda name: "x",
        legacy={"COHORTFLOW_DATA_ROOTS": f"{HOME}:/"},
    )
    assert stored.values["COHORTFLOW_DATA_ROOTS"] == str(HOME)


def test_unset_variables_mean_the_stored_values() -> None:
    stored = create(COHORTFLOW_API_TOKEN="tok")
    assert stored.differences({}) == []
    assert stored.environment()["COHORTFLOW_API_TOKEN"] == "tok"


def test_equal_spellings_are_no_change() -> None:
    stored = create(COHORTFLOW_LOG_JSON="true", COHORTFLOW_DATA_ROOTS="/a:/b")
    assert stored.differences({"COHORTFLOW_LOG_JSON": "1", "COHORTFLOW_DATA_ROOTS": "/b:/a/"}) == []


def test_a_changed_value_is_a_difference_and_apply_stores_it() -> None:
    stored = create(COHORTFLOW_API_TOKEN="tok")
    changes = stored.differences({"COHORTFLOW_API_TOKEN": "", "COHORTFLOW_LOG_LEVEL": "DEBUG"})
    assert [c.field for c in changes] == ["api_token", "log_level"]
    assert not any(c.fixed for c in changes)
    text = changes[0].describe()
    assert "tok" not in text and "COHORTFLOW_API_TOKEN" in text and "(unset)" in text
    stored.apply(changes)
    assert stored.differences({}) == []
    assert stored.values["COHORTFLOW_API_TOKEN"] == ""
    assert stored.values["COHORTFLOW_LOG_LEVEL"] == "DEBUG"


def test_the_project_secret_cannot_change() -> None:
    stored = create()
    (change,) = stored.differences({"COHORTFLOW_PROJECT_SECRET": "another"})
    assert change.fixed
    assert "cannot change" in change.describe() and "another" not in change.describe()


def test_invalid_values_name_their_variable() -> None:
    with pytest.raises(SettingsError, match="COHORTFLOW_ITEM_MAX_ATTEMPTS"):
        create(COHORTFLOW_ITEM_MAX_ATTEMPTS="many")


def test_a_run_folder_is_granted_once_and_exported_roots_are_no_change(tmp_path: Path) -> None:
    stored = create(COHORTFLOW_DATA_ROOTS=str(tmp_path / "roots"))
    inside = tmp_path / "roots" / "study"
    outside = tmp_path / "elsewhere"
    assert stored.grant([inside]) == []
    assert stored.grant([outside]) == [str(outside)]
    assert stored.grant([outside / "sub"]) == []
    exported = stored.environment()["COHORTFLOW_DATA_ROOTS"]
    assert exported.split(":") == [str(tmp_path / "roots"), str(outside)]
    # what `stack env` exports, and what was configured, both agree with the stack
    assert stored.differences({"COHORTFLOW_DATA_ROOTS": exported}) == []
    assert stored.differences({"COHORTFLOW_DATA_ROOTS": str(tmp_path / "roots")}) == []
    assert len(stored.differences({"COHORTFLOW_DATA_ROOTS": "/"})) == 1


def test_settings_added_later_are_completed() -> None:
    stored = create()
    del stored.values["COHORTFLOW_LOG_LEVEL"]
    assert stored.complete({"COHORTFLOW_LOG_LEVEL": "WARNING"})
    assert stored.values["COHORTFLOW_LOG_LEVEL"] == "WARNING"
    assert not stored.complete({})


def test_status_masks_every_secret() -> None:
    stored = create(COHORTFLOW_API_TOKEN="tok", COHORTFLOW_S3_SECRET_KEY="s3-secret")
    shown = stored.shown()
    for name in ("COHORTFLOW_API_TOKEN", "COHORTFLOW_S3_SECRET_KEY", "COHORTFLOW_PROJECT_SECRET"):
        assert shown[name].startswith("(set, sha256 "), name
    assert "tok" not in str(shown) and "s3-secret" not in str(shown)
    assert shown["COHORTFLOW_DATA_ROOTS"] == str(HOME)
    assert masked("api_token", "") == "(unset)"


def test_only_settings_are_requested() -> None:
    environ = {"COHORTFLOW_API_TOKEN": "", "COHORTFLOW_GATEWAY_PORT": "1", "PATH": "/bin"}
    assert requested_from(environ) == {"COHORTFLOW_API_TOKEN": ""}
