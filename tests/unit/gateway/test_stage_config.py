from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.gateway.cohorts.stage_config import (
    StageConfigError,
    event_config,
    expand_dotted_keys,
    public_config,
    scoped_run_config,
    validate_stage_config,
)
from shared.secrets import SecretError, unseal
from shared.settings import Settings
from shared.topics import Stage

SETTINGS = Settings(
    data_roots=[Path("/nonexistent-root")], project_secret=SecretStr("project-secret")
)
AUDIT = {"audit_export": {"format": "csv", "password": "correct horse"}}


def test_dotted_keys_are_nested_objects() -> None:
    assert expand_dotted_keys({"patient_id.strategy": "folder", "a": {"b.c": 1}}) == {
        "patient_id": {"strategy": "folder"},
        "a": {"b": {"c": 1}},
    }
    assert expand_dotted_keys({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(StageConfigError, match="given twice"):
        expand_dotted_keys({"a.b": 1, "a": {"b": 2}})


@pytest.mark.parametrize(
    ("stage", "raw", "expected"),
    [
        # only what the user set travels: defaults are the stage service's own
        (Stage.extraction, {}, {}),
        (Stage.extraction, {"process_pool_workers": 4}, {"process_pool_workers": 4}),
        (Stage.sorting, {"profile": "research"}, {"profile": "research"}),
        (
            Stage.sorting,
            {"forceReprocess": True},
            {"forceReprocess": True, "skipClassified": False},
        ),
        (Stage.sorting, {"selectedModalities": ["MR"]}, {"selectedModalities": ["MR"]}),
        (
            Stage.export,
            {"layout": "flat", "outputModes": ["dcm", "nii"]},
            {"layout": "flat", "outputModes": ["dcm", "nii"]},
        ),
        (
            Stage.anonymization,
            {"patient_id.strategy": "folder", "patient_id.folder_regex": "^(P\\d+)$", **AUDIT},
            {
                "patient_id": {"strategy": "folder", "folder_regex": "^(P\\d+)$"},
                "audit_export": {"format": "csv", "password": "***"},
            },
        ),
        (
            Stage.anonymization,
            {"study_dates": {"enabled": True, "offset_range_days": [-100, -10]}, **AUDIT},
            {
                "study_dates": {"enabled": True, "offset_range_days": [-100, -10]},
                "audit_export": {"format": "csv", "password": "***"},
            },
        ),
        (
            Stage.anonymization,
            {
                "retain_safe_private": False,
                "patient_id": {"strategy": "csv", "csv": "a,b"},
                **AUDIT,
            },
            {
                "retain_safe_private": False,
                # the mapping is a table of original patient IDs: never shown back
                "patient_id": {"strategy": "csv", "csv": "***"},
                "audit_export": {"format": "csv", "password": "***"},
            },
        ),
    ],
)
def test_valid_configs(stage: Stage, raw: dict[str, Any], expected: dict[str, Any]) -> None:
    assert public_config(validate_stage_config(stage, raw, SETTINGS)) == expected


@pytest.mark.parametrize(
    ("stage", "raw", "where"),
    [
        (Stage.extraction, {"threads": 4}, "config.threads: unknown key"),
        (Stage.extraction, {"process_pool_workers": 0}, "config.process_pool_workers"),
        (Stage.extraction, {"scan_thread_workers": "many"}, "config.scan_thread_workers"),
        (Stage.sorting, {"profile": "fast"}, "config.profile"),
        (Stage.sorting, {"selectedModalities": ["US"]}, "config.selectedModalities.0"),
        (Stage.sorting, {"selectedModalities": []}, "config.selectedModalities"),
        (Stage.sorting, {"skipClassified": True, "forceReprocess": True}, "contradict"),
        (Stage.export, {"outputModes": ["mp4"]}, "config.outputModes.0"),
        (Stage.export, {"includeIntents": ["anat", "beh"]}, "config.includeIntents.1"),
        (Stage.export, {"includeProvenance": ["Other"]}, "config.includeProvenance.0"),
        (Stage.export, {"destination": "/etc"}, "'/etc' is outside the allowed data roots"),
        (Stage.anonymization, {}, "config.audit_export: Field required"),
        (Stage.anonymization, {"audit_export": {"format": "csv"}}, "audit_export.password"),
        (Stage.anonymization, {"audit_export.password": "short"}, "audit_export.password"),
        (Stage.anonymization, {"patient_id": {"strategy": "random"}, **AUDIT}, "strategy"),
        (Stage.anonymization, {"patient_id.strategy": "csv", **AUDIT}, "patient_id.csv"),
        (Stage.anonymization, {"patient_id.hash_bits": 32, **AUDIT}, "patient_id.hash_bits"),
        (Stage.anonymization, {"patient_id.folder_regex": "P\\d+", **AUDIT}, "capture group"),
        (Stage.anonymization, {"patient_id.folder_regex": "(", **AUDIT}, "not a regular"),
        (Stage.anonymization, {"study_dates.offset_range_days": [5, 1], **AUDIT}, "min <= max"),
        (Stage.anonymization, {"retain_uids": "maybe", **AUDIT}, "config.retain_uids"),
        (Stage.anonymization, {"anonymize_categories": ["all"], **AUDIT}, "categories.0"),
        (Stage.anonymization, {"study_dates": {"enabled": "sometimes"}, **AUDIT}, "enabled"),
        (Stage.anonymization, {"study_dates.timepoint_step_months": 0, **AUDIT}, "step_months"),
        (Stage.anonymization, {"process_pool_workers": 0, **AUDIT}, "process_pool_workers"),
    ],
)
def test_bad_configs_say_where(stage: Stage, raw: dict[str, Any], where: str) -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_stage_config(stage, raw, SETTINGS)
    assert where in str(caught.value)
    assert all(error["loc"][0] == "config" for error in caught.value.errors)


def test_the_audit_password_is_never_public_and_travels_sealed() -> None:
    config = validate_stage_config(Stage.anonymization, AUDIT, SETTINGS)
    public = public_config(config)
    assert public["audit_export"]["password"] == "***"
    assert "correct horse" not in repr(public) and "correct horse" not in repr(config)
    sent = event_config(config, SETTINGS)
    token = sent["audit_export"]["password"]
    assert "correct horse" not in token
    assert unseal(token, SETTINGS) == "correct horse"
    with pytest.raises(SecretError):
        unseal(token, Settings(project_secret=SecretStr("another-secret")))
    with pytest.raises(SecretError, match="PROJECT_SECRET"):
        event_config(config, Settings(project_secret=SecretStr("")))


def test_export_destination_under_a_root(tmp_path: Path) -> None:
    settings = Settings(data_roots=[tmp_path])
    target = str(tmp_path / "out" / "bids")
    config = validate_stage_config(Stage.export, {"destination": target}, settings)
    assert public_config(config)["destination"] == target
    with pytest.raises(StageConfigError, match="outside the allowed data roots"):
        validate_stage_config(Stage.export, {"destination": f"{tmp_path}/../x"}, settings)


def test_scoped_runs_reuse_the_last_config_without_its_secrets() -> None:
    stored = public_config(validate_stage_config(Stage.anonymization, AUDIT, SETTINGS))
    assert scoped_run_config(stored) == {"audit_export": {"format": "csv"}}
    assert scoped_run_config(None) == {}
    assert scoped_run_config({"layout": "flat"}) == {"layout": "flat"}
