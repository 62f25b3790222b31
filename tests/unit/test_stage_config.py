from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from shared.secrets import SECRET_KEYS, SecretError, unseal
from shared.settings import Settings
from shared.stage_config import (
    SECRET_FIELDS,
    AnonymizationConfig,
    ExportConfig,
    ExtractionConfig,
    JobConfigs,
    SortingConfig,
    StageConfigError,
    config_json_schemas,
    event_config,
    expand_dotted_keys,
    public_config,
    read_stage_config,
    scoped_run_config,
    validate_stage_config,
)
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


def test_every_secret_field_is_sealed_on_the_bus() -> None:
    assert {"password", "csv"} == SECRET_FIELDS
    assert SECRET_FIELDS <= SECRET_KEYS  # the names `seal_config` seals


def test_every_field_has_a_description_for_the_web_forms() -> None:
    def undescribed(schema: dict[str, Any], where: str) -> list[str]:
        missing = []
        for name, prop in schema.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{where}.{name}")
        for name, sub in schema.get("$defs", {}).items():
            missing += undescribed(sub, name)
        return missing

    schemas = config_json_schemas()
    assert set(schemas) == {stage.value for stage in Stage}
    assert [m for stage, s in schemas.items() for m in undescribed(s, stage)] == []
    password = schemas["anonymization"]["$defs"]["AuditExportConfig"]["properties"]["password"]
    assert password["format"] == "password" and password["writeOnly"] is True
    assert "audit_export" in schemas["anonymization"]["required"]


def test_a_service_reads_what_the_gateway_sends() -> None:
    raw = {"patient_id.strategy": "csv", "patient_id.csv": "original,pseudonym\nP1,S1\n", **AUDIT}
    sent = event_config(validate_stage_config(Stage.anonymization, raw, SETTINGS), SETTINGS)
    read = read_stage_config(AnonymizationConfig, sent, SETTINGS)
    assert read.audit_export.password is not None
    assert read.audit_export.password.get_secret_value() == "correct horse"
    assert read.patient_id.csv is not None and "P1,S1" in read.patient_id.csv.get_secret_value()
    assert read.study_dates.offset_range_days == (-365, -30)  # defaults applied by the read
    with pytest.raises(StageConfigError, match="arrived unsealed"):
        read_stage_config(AnonymizationConfig, AUDIT, SETTINGS)


def test_a_scoped_run_may_come_without_its_secrets() -> None:
    sent = scoped_run_config(
        public_config(validate_stage_config(Stage.anonymization, AUDIT, SETTINGS))
    )
    with pytest.raises(StageConfigError, match=r"audit_export\.password: Field required"):
        read_stage_config(AnonymizationConfig, sent, SETTINGS)
    read = read_stage_config(AnonymizationConfig, sent, SETTINGS, secrets_withheld=True)
    assert read.audit_export.format == "csv" and read.audit_export.password is None
    empty = read_stage_config(AnonymizationConfig, {}, SETTINGS, secrets_withheld=True)
    assert empty.audit_export.password is None


@pytest.mark.parametrize(
    ("model", "raw", "where"),
    [
        # the limits the services honour are the ones the gateway checks (no silent clamp)
        (ExtractionConfig, {"process_pool_workers": 65}, "less than or equal to 64"),
        (ExtractionConfig, {"scan_thread_workers": 65}, "less than or equal to 64"),
        (AnonymizationConfig, {"process_pool_workers": 65}, "less than or equal to 64"),
        (ExportConfig, {"convert_timeout_s": 0}, "convert_timeout_s"),
    ],
)
def test_limits_are_declared_once(model: Any, raw: dict[str, Any], where: str) -> None:
    with pytest.raises(StageConfigError, match=where):
        read_stage_config(model, raw, SETTINGS, secrets_withheld=True)


def test_options_the_gateway_refused_can_be_set() -> None:
    config = validate_stage_config(
        Stage.export, {"convert_timeout_s": 60, "validate_timeout_s": 120}, SETTINGS
    )
    read = read_stage_config(ExportConfig, event_config(config, SETTINGS), SETTINGS)
    assert (read.convert_timeout_s, read.validate_timeout_s) == (60, 120)
    assert read_stage_config(ExtractionConfig, {"batch_files": 500}, SETTINGS).batch_files == 500


def test_a_job_config_is_read_once() -> None:
    configs = JobConfigs(SortingConfig, keep=2)
    job = uuid.uuid4()
    first = configs.read(job, {"profile": "research"}, SETTINGS)
    assert configs.read(job, {"profile": "research"}, SETTINGS) is first
    for _ in range(2):
        configs.read(uuid.uuid4(), {}, SETTINGS)
    assert configs.read(job, {"profile": "research"}, SETTINGS) is not first
