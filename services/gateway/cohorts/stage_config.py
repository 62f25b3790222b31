"""Stage configuration, validated with the user's own key names (seed/cohort-operations.txt).

Dotted keys are nested objects: `{"patient_id": {"strategy": "folder"}}`; the literal dotted form
`{"patient_id.strategy": "folder"}` is accepted too and expanded. Unknown keys and bad values are
refused (`StageConfigError`, a 422 for the API). Only what the user set is handed on (defaults are
the stage service's own), in two forms:
`public_config` (secrets redacted: what the gateway stores and shows) and
`event_config` (what the stage service receives: secrets sealed with `shared.secrets`, so that the
audit password is never in clear in a gateway table, the outbox included, nor on the bus).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from shared.secrets import SECRET_KEYS, redact_config, seal_config
from shared.settings import Settings
from shared.sources import SourceError, check_destination
from shared.topics import Stage
from shared.vocabulary import ANONYMIZE_CATEGORIES, AnonymizeCategory, PatientIdStrategy


class StageConfigError(ValueError):
    """Bad stage config; `errors` lists `{loc, msg, type}` like FastAPI's own 422 details."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- anonymization ---------------------------------------------------------------------------


class PatientIdConfig(_Config):
    """How pseudonyms are derived (the anonymizer's `PatientIdOptions` documents each key)."""

    strategy: PatientIdStrategy = "hash"
    prefix: str | None = Field(default=None, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9]+$")
    hash_bits: int | None = Field(default=None, ge=64, le=160)
    digits: int | None = Field(default=None, ge=1, le=12)
    folder_regex: str | None = Field(default=None, min_length=1, max_length=500)
    folder_depth: int | None = Field(default=None, ge=0, le=64)
    folder_fallback: str | None = Field(default=None, min_length=1, max_length=200)
    # strategy "csv": the mapping table's text, columns `original,pseudonym`
    csv: str | None = Field(default=None, min_length=1, max_length=10_000_000)
    unmapped: Literal["error", "hash"] | None = None

    @model_validator(mode="after")
    def _csv_needs_a_table(self) -> PatientIdConfig:
        if self.strategy == "csv" and not self.csv:
            raise ValueError("strategy 'csv' needs patient_id.csv (the mapping table's text)")
        if self.folder_regex is not None:
            try:
                compiled = re.compile(self.folder_regex)
            except re.error as exc:
                raise ValueError(f"folder_regex is not a regular expression: {exc}") from exc
            if compiled.groups != 1:
                raise ValueError("patient_id.folder_regex needs exactly one capture group")
        return self


class StudyDatesConfig(_Config):
    enabled: bool = False  # shift dates by a per-subject offset
    offset_range_days: tuple[int, int] | None = None
    # ClinicalTrialTimePointID = M00, M06, ...: months from the subject's first study, rounded
    timepoint_labels: bool = False
    timepoint_step_months: int = Field(default=6, ge=1, le=24)

    @model_validator(mode="after")
    def _range(self) -> StudyDatesConfig:
        if self.offset_range_days is not None:
            low, high = self.offset_range_days
            if low > high or low == high == 0:
                raise ValueError("offset_range_days must be [min, max], min <= max, not [0, 0]")
        return self


class AuditExportConfig(_Config):
    format: Literal["encrypted_excel", "csv"] = "encrypted_excel"
    # encrypts the audit export; required, never defaulted, never stored or returned in clear
    password: SecretStr = Field(min_length=8)


class AnonymizationConfig(_Config):
    patient_id: PatientIdConfig = PatientIdConfig()
    study_dates: StudyDatesConfig = StudyDatesConfig()
    audit_export: AuditExportConfig
    anonymize_categories: list[AnonymizeCategory] = Field(
        default_factory=lambda: list(ANONYMIZE_CATEGORIES), min_length=1
    )
    # PS3.15 option switches (ADR 0003)
    clean_descriptors: bool | None = None
    retain_patient_characteristics: bool | None = None
    retain_device_identity: bool | None = None
    retain_institution_identity: bool | None = None
    retain_safe_private: bool | None = None
    retain_uids: bool | None = None
    quarantine_burned_in: bool | None = None
    # worker processes de-identifying files (None: one per CPU of the machine it runs on)
    process_pool_workers: int | None = Field(default=None, ge=1, le=128)


# --- extraction ------------------------------------------------------------------------------


class ExtractionConfig(_Config):
    # None: the extractor sizes its pools for the machine it runs on
    process_pool_workers: int | None = Field(default=None, ge=1, le=128)
    scan_thread_workers: int | None = Field(default=None, ge=1, le=256)
    folder_thread_workers: int | None = Field(default=None, ge=1, le=256)
    # files per work item (smaller: finer sharing among replicas and quicker cancel)
    batch_files: int | None = Field(default=None, ge=1, le=10000)


# --- sorting ---------------------------------------------------------------------------------


Modality = Literal["MR", "CT", "PT"]


class SortingConfig(_Config):
    profile: Literal["standard", "research"] = "standard"
    selectedModalities: list[Modality] = Field(
        default_factory=lambda: list(get_args(Modality)), min_length=1
    )
    # default: skip what is classified already, unless forceReprocess asks for everything
    skipClassified: bool = True
    forceReprocess: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_skip(cls, data: Any) -> Any:
        if isinstance(data, dict) and "skipClassified" not in data and data.get("forceReprocess"):
            return {**data, "skipClassified": False}
        return data

    @model_validator(mode="after")
    def _not_both(self) -> SortingConfig:
        if self.skipClassified and self.forceReprocess:
            raise ValueError("skipClassified and forceReprocess contradict each other")
        return self


# --- export ----------------------------------------------------------------------------------


OutputMode = Literal["dcm", "nii", "nii.gz"]
Intent = Literal["anat", "dwi", "func", "fmap", "perf"]
Provenance = Literal["SyMRI", "SWIRecon", "EPIMix"]


def _default_output_modes() -> list[OutputMode]:
    return ["nii.gz"]


class ExportConfig(_Config):
    outputModes: list[OutputMode] = Field(default_factory=_default_output_modes, min_length=1)
    layout: Literal["bids", "flat"] = "bids"
    includeIntents: list[Intent] = Field(
        default_factory=lambda: list(get_args(Intent)), min_length=1
    )
    includeProvenance: list[Provenance] = Field(default_factory=lambda: list(get_args(Provenance)))
    groupSyMRI: bool = False
    # skip: a stack whose outputs an earlier export of the cohort already wrote is not redone
    overwrite: Literal["skip", "overwrite"] = "skip"
    # also copy the export here: a folder under an allowed data root, or s3://bucket/prefix
    destination: str | None = None


StageConfig = AnonymizationConfig | ExtractionConfig | SortingConfig | ExportConfig

CONFIG_MODELS: dict[Stage, type[_Config]] = {
    Stage.anonymization: AnonymizationConfig,
    Stage.extraction: ExtractionConfig,
    Stage.sorting: SortingConfig,
    Stage.export: ExportConfig,
}


def expand_dotted_keys(raw: Mapping[str, Any], where: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{"a.b": 1}` -> `{"a": {"b": 1}}`, recursively; a key given twice is an error."""
    expanded: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise StageConfigError([_error((*where, str(key)), "keys must be non-empty strings")])
        parts = key.split(".")
        if isinstance(value, Mapping):
            value = expand_dotted_keys(value, (*where, *parts))
        node = expanded
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise StageConfigError([_error((*where, *parts[: depth + 1]), "given twice")])
            node = child
        last = parts[-1]
        if last in node:
            if isinstance(node[last], dict) and isinstance(value, dict):
                _merge(node[last], value, (*where, *parts))
                continue
            raise StageConfigError([_error((*where, *parts), "given twice")])
        node[last] = value
    return expanded


def _merge(into: dict[str, Any], extra: dict[str, Any], where: tuple[str, ...]) -> None:
    for key, value in extra.items():
        if key in into and isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, (*where, key))
        elif key in into:
            raise StageConfigError([_error((*where, key), "given twice")])
        else:
            into[key] = value


def _error(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": ["config", *loc], "msg": msg, "type": kind}


def validate_stage_config(
    stage: Stage, raw: Mapping[str, Any] | None, settings: Settings
) -> StageConfig:
    """The user's config for `stage` as its model, or `StageConfigError` saying what is wrong.

    Locations in the config (export `destination`, `patient_id.csv_path`) are checked against the
    allowed data roots of `settings`, like a cohort's source_path.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise StageConfigError([_error((), "config must be a JSON object")])
    model = CONFIG_MODELS[Stage(stage)]
    try:
        config = model.model_validate(expand_dotted_keys(raw or {}))
    except ValidationError as exc:
        raise StageConfigError(
            [
                _error(
                    e["loc"],
                    e["msg"].replace("Extra inputs are not permitted", "unknown key"),
                    e["type"],
                )
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from exc
    _check_locations(config, settings)
    return config  # type: ignore[return-value]


def _check_locations(config: _Config, settings: Settings) -> None:
    if isinstance(config, ExportConfig) and config.destination:
        try:
            check_destination(config.destination, settings)
        except (SourceError, ValueError, OSError) as exc:  # NUL bytes, names too long, ...
            raise StageConfigError([_error(("destination",), str(exc))]) from exc


def _given(config: StageConfig) -> dict[str, Any]:
    """What the user set: defaults stay the stage service's, so the two can never disagree."""
    return config.model_dump(mode="json", exclude_unset=True)


def public_config(config: StageConfig) -> dict[str, Any]:
    """The config as the gateway stores and shows it: as given, secrets as `"***"`."""
    return dict(redact_config(_given(config)))


def event_config(config: StageConfig, settings: Settings) -> dict[str, Any]:
    """The config as the stage service receives it: secrets sealed (`sealed:v1:...`).

    Raises `shared.secrets.SecretError` when there is a secret to pass but no project secret.
    """
    data = _given(config)
    if isinstance(config, AnonymizationConfig):
        data["audit_export"]["password"] = config.audit_export.password.get_secret_value()
    return dict(seal_config(data, settings))


def without_secrets(config: Any) -> Any:
    """A stored (redacted) config with its secret keys left out altogether."""
    if isinstance(config, dict):
        return {k: without_secrets(v) for k, v in config.items() if k not in SECRET_KEYS}
    if isinstance(config, list):
        return [without_secrets(v) for v in config]
    return config


def scoped_run_config(previous: dict[str, Any] | None) -> dict[str, Any]:
    """The config of a scoped "new study" run: the cohort's last config for the stage, or none.

    A scoped run has no user at hand to type a secret, so secrets are left out (the anonymizer then
    records the study's audit rows without writing a new encrypted audit export).
    """
    return dict(without_secrets(previous)) if previous is not None else {}
