"""Each stage's config as one pydantic model: what the user may set, its default and its limits.

The gateway validates what the user sends with these models (`validate_stage_config`, refusing
unknown keys and bad values with `StageConfigError`, a 422 for the API) and publishes their JSON
Schema (`config_json_schemas`, from which the web forms are generated). Each stage service reads
the config it receives through the same model (`read_stage_config`) and builds its pure core's own
frozen options from it. A new option is one field here plus the code that uses it.

Dotted keys are nested objects: `{"patient_id": {"strategy": "folder"}}`; the literal dotted form
`{"patient_id.strategy": "folder"}` is accepted too and expanded.

Only what the user set is handed on (the defaults live here, applied again by the service's read),
in two forms: `public_config` (secrets redacted: what the gateway stores and shows) and
`event_config` (what the stage service receives: secrets sealed with `shared.secrets`, so that the
audit password is never in clear in a gateway table, the outbox included, nor on the bus). A secret
is a field typed `Secret`; the service's read opens it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.secrets import is_sealed, seal_config, unseal
from shared.settings import Settings
from shared.sources import SourceError, check_destination
from shared.topics import Stage
from shared.vocabulary import (
    ANONYMIZE_CATEGORIES,
    EXPORT_INTENTS,
    EXPORT_PROVENANCES,
    MODALITIES,
    AnonymizeCategory,
    AuditFormat,
    ExportIntent,
    ExportLayout,
    ExportProvenance,
    Modality,
    OutputMode,
    OverwritePolicy,
    PatientIdStrategy,
)

REDACTED = "***"
# the most worker processes or threads one pool of a stage service may have
MAX_POOL = 64


class StageConfigError(ValueError):
    """Bad stage config; `errors` lists `{loc, msg, type}` like FastAPI's own 422 details."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


# --- secrets -------------------------------------------------------------------------------------
# Validation context: `open_with` (the service's Settings) opens sealed secrets as a service reads
# them; `secrets_withheld` (a scoped "new study" run) lets required secrets be absent.
# Serialization context: `reveal_secrets` gives their values (to be sealed at once), else `***`.


def _context(info: ValidationInfo | SerializationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


def _open_secret(value: Any, info: ValidationInfo) -> Any:
    settings = _context(info).get("open_with")
    if settings is None or value is None or isinstance(value, SecretStr):
        return value
    if not is_sealed(value):
        raise ValueError(
            "arrived unsealed; secrets travel sealed (shared.stage_config.event_config, as the"
            " gateway does), never in clear on the bus"
        )
    return unseal(str(value), settings)


def _dump_secret(value: SecretStr, info: SerializationInfo) -> str:
    return value.get_secret_value() if _context(info).get("reveal_secrets") else REDACTED


Secret = Annotated[
    SecretStr,
    BeforeValidator(_open_secret),
    PlainSerializer(_dump_secret, return_type=str),
]
"""A secret value: never shown back (`***`), sealed on the bus, opened by the service's read."""


def _secret_field(description: str, *, password: bool = False, **limits: Any) -> Any:
    extra: dict[str, Any] = {"writeOnly": True}
    if password:
        extra["format"] = "password"
    return Field(default=None, description=description, json_schema_extra=extra, **limits)


def _required_unless_withheld(value: Any, info: ValidationInfo) -> Any:
    """A secret (or the section holding it) a run the user starts must give; a scoped run reuses
    the cohort's last config, whose secrets are not kept, so there it may be absent."""
    if value is None:
        if not _context(info).get("secrets_withheld"):
            raise PydanticCustomError("missing", "Field required")
        return None
    return value


def _also_required(*names: str) -> Any:
    """JSON Schema: these fields are required from the user (validated by
    `_required_unless_withheld`, since a scoped run may lack them)."""

    def patch(schema: dict[str, Any]) -> None:
        schema["required"] = sorted({*schema.get("required", []), *names})
        for name in names:
            schema["properties"][name].pop("default", None)

    return patch


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- anonymization -------------------------------------------------------------------------------


class PatientIdConfig(_Config):
    """How pseudonyms are derived (the anonymizer's `PatientIdOptions` documents each strategy)."""

    strategy: PatientIdStrategy = Field(
        default="hash",
        description="How the pseudonym is derived: folder, hash, sequential, csv or none.",
    )
    prefix: str = Field(
        default="",
        max_length=32,
        pattern=r"^[A-Za-z0-9]*$",
        description="Letters and digits put before every pseudonym (none by default).",
    )
    hash_bits: int = Field(
        default=80, ge=64, le=160, description="Bits of the keyed hash (strategy hash)."
    )
    digits: int = Field(
        default=4, ge=1, le=12, description="Digits of the sequential number (strategy sequential)."
    )
    folder_regex: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Regular expression with one capture group, searched in the folder name.",
    )
    folder_depth: int = Field(
        default=0, ge=0, le=64, description="Which folder of the path to read (0 = the first)."
    )
    folder_fallback: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Pseudonym when folder_regex does not match; {folder} is the folder name.",
    )
    csv: Secret | None = _secret_field(
        "Mapping table text, columns original,pseudonym (strategy csv).",
        min_length=1,
        max_length=10_000_000,
    )
    unmapped: Literal["error", "hash"] = Field(
        default="error",
        description="Strategy csv, a patient not in the table: refuse it, or hash its ID.",
    )

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
    enabled: bool = Field(
        default=False, description="Shift dates by a per-subject offset instead of removing them."
    )
    offset_range_days: tuple[int, int] = Field(
        default=(-365, -30), description="[min, max] of the per-subject date offset, in days."
    )
    timepoint_labels: bool = Field(
        default=False,
        description="Set ClinicalTrialTimePointID (M00, M06, ...): months from the first study.",
    )
    timepoint_step_months: int = Field(
        default=6, ge=1, le=24, description="Months between two timepoint labels."
    )

    @model_validator(mode="after")
    def _range(self) -> StudyDatesConfig:
        low, high = self.offset_range_days
        if low > high or low == high == 0:
            raise ValueError("offset_range_days must be [min, max], min <= max, not [0, 0]")
        return self


class AuditExportConfig(_Config):
    model_config = ConfigDict(json_schema_extra=_also_required("password"))

    format: AuditFormat = Field(
        default="encrypted_excel", description="File format of the encrypted audit export."
    )
    password: Secret | None = _secret_field(
        "Encrypts the audit export; required, never defaulted, never stored or shown.",
        password=True,
        min_length=8,
        validate_default=True,
    )

    _password_required = field_validator("password", mode="after")(_required_unless_withheld)


class AnonymizationConfig(_Config):
    model_config = ConfigDict(json_schema_extra=_also_required("audit_export"))

    patient_id: PatientIdConfig = Field(
        default_factory=PatientIdConfig, description="How pseudonyms are derived."
    )
    study_dates: StudyDatesConfig = Field(
        default_factory=StudyDatesConfig, description="Dates: removed, or shifted per subject."
    )
    audit_export: AuditExportConfig = Field(
        default=None,
        validate_default=True,
        description="The encrypted audit export, the only key from pseudonyms back to patients.",
    )
    anonymize_categories: list[AnonymizeCategory] = Field(
        default_factory=lambda: list(ANONYMIZE_CATEGORIES),
        min_length=1,
        description="Categories of attributes to de-identify (all by default).",
    )
    # PS3.15 options (ADR 0003); the code of each is in the anonymizer's ProfileOptions
    clean_descriptors: bool = Field(
        default=True, description="Clean descriptions instead of removing them (113105)."
    )
    retain_patient_characteristics: bool = Field(
        default=False, description="Keep sex, age, size and weight (113108)."
    )
    retain_device_identity: bool = Field(
        default=False, description="Keep device names and serial numbers (113109)."
    )
    retain_institution_identity: bool = Field(
        default=False, description="Keep institution names and addresses (113112)."
    )
    retain_safe_private: bool = Field(
        default=True, description="Keep private attributes known to be safe (113111)."
    )
    retain_uids: bool = Field(default=False, description="Keep the original UIDs (113110).")
    quarantine_burned_in: bool = Field(
        default=True, description="Hold back images that may show burned-in text."
    )
    process_pool_workers: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL,
        description="Worker processes de-identifying files (default: one per CPU).",
    )

    @field_validator("audit_export", mode="before")
    @classmethod
    def _audit_export_given(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and _context(info).get("secrets_withheld"):
            return {}  # its format's default, no password: no audit export is written
        return _required_unless_withheld(value, info)


# --- extraction ----------------------------------------------------------------------------------


class ExtractionConfig(_Config):
    process_pool_workers: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL,
        description="Worker processes parsing headers (default: one per CPU).",
    )
    scan_thread_workers: int = Field(
        default=4, ge=1, le=MAX_POOL, description="Threads reading files in each worker process."
    )
    folder_thread_workers: int = Field(
        default=4, ge=1, le=MAX_POOL, description="Threads listing folders of the source."
    )
    copy_sources: bool = Field(
        default=False,
        description=(
            "Copy every file of a local source folder into the raw zone of object storage as it"
            " is catalogued. Off (the default), the files are catalogued in place: later stages"
            " read them from the folder and check each against its catalogued SHA-256, so a file"
            " changed or removed since fails that stage's item until extraction runs again."
            " An s3:// source, and a new study's folder outside the cohort's, are always copied."
        ),
    )
    batch_files: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Files per work item (smaller: finer sharing among replicas, quicker cancel).",
    )


# --- sorting -------------------------------------------------------------------------------------


class SortingConfig(_Config):
    profile: Literal["standard", "research"] = Field(
        default="standard", description="Classification rule pack."
    )
    selectedModalities: list[Modality] = Field(
        default_factory=lambda: list(MODALITIES),
        min_length=1,
        description="Modalities to classify; other stacks are left out.",
    )
    skipClassified: bool = Field(
        default=True,
        description="Skip stacks already classified at this rule version (off with forceReprocess).",
    )
    forceReprocess: bool = Field(
        default=False, description="Classify every stack again, classified or not."
    )

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


# --- export --------------------------------------------------------------------------------------


def _nifti_gz() -> list[OutputMode]:
    return ["nii.gz"]


class ExportConfig(_Config):
    outputModes: list[OutputMode] = Field(
        default_factory=_nifti_gz,
        min_length=1,
        description="Outputs of each stack: dcm (a DICOM copy), nii or nii.gz.",
    )
    layout: ExportLayout = Field(
        default="bids", description="bids (a BIDS dataset) or flat (one folder per stack)."
    )
    includeIntents: list[ExportIntent] = Field(
        default_factory=lambda: list(EXPORT_INTENTS),
        min_length=1,
        description="BIDS datatypes to export.",
    )
    includeProvenance: list[ExportProvenance] = Field(
        default_factory=lambda: list(EXPORT_PROVENANCES),
        description="Derived series (by their provenance) to export.",
    )
    groupSyMRI: bool = Field(
        default=False, description="Name SyMRI outputs as one group of the same acquisition."
    )
    overwrite: OverwritePolicy = Field(
        default="skip",
        description="skip: a stack an earlier export already wrote the same is not redone.",
    )
    destination: str | None = Field(
        default=None,
        description="Also copy the export here: a folder under an allowed data root, or s3://...",
    )
    convert_timeout_s: float = Field(
        default=600.0, gt=0, le=86_400, description="Seconds one stack's conversion may take."
    )
    validate_timeout_s: float = Field(
        default=900.0, gt=0, le=86_400, description="Seconds the BIDS validator may take."
    )


StageConfig = AnonymizationConfig | ExtractionConfig | SortingConfig | ExportConfig
AnyConfig = TypeVar("AnyConfig", AnonymizationConfig, ExtractionConfig, SortingConfig, ExportConfig)
_Model = TypeVar("_Model", bound=_Config)

CONFIG_MODELS: dict[Stage, type[StageConfig]] = {
    Stage.anonymization: AnonymizationConfig,
    Stage.extraction: ExtractionConfig,
    Stage.sorting: SortingConfig,
    Stage.export: ExportConfig,
}


def config_json_schemas() -> dict[str, dict[str, Any]]:
    """Each stage's config as JSON Schema, by stage name (the web forms are generated from it)."""
    return {stage.value: model.model_json_schema() for stage, model in CONFIG_MODELS.items()}


# --- reading -------------------------------------------------------------------------------------


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


def _parse(model: type[_Model], raw: Mapping[str, Any] | None, context: dict[str, Any]) -> _Model:
    if raw is not None and not isinstance(raw, Mapping):
        raise StageConfigError([_error((), "config must be a JSON object")])
    try:
        return model.model_validate(expand_dotted_keys(raw or {}), context=context)
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


def validate_stage_config(
    stage: Stage, raw: Mapping[str, Any] | None, settings: Settings
) -> StageConfig:
    """The user's config for `stage` as its model, or `StageConfigError` saying what is wrong.

    Locations in the config (export `destination`) are checked against the allowed data roots of
    `settings`, like a cohort's source_path.
    """
    config: StageConfig = _parse(CONFIG_MODELS[Stage(stage)], raw, {})
    if isinstance(config, ExportConfig) and config.destination:
        try:
            check_destination(config.destination, settings)
        except (SourceError, ValueError, OSError) as exc:  # NUL bytes, names too long, ...
            raise StageConfigError([_error(("destination",), str(exc))]) from exc
    return config


def read_stage_config(
    model: type[AnyConfig],
    raw: Mapping[str, Any] | None,
    settings: Settings,
    *,
    secrets_withheld: bool = False,
) -> AnyConfig:
    """The config a stage service received (`event_config`), read with its stage's model: defaults
    applied, sealed secrets opened. `secrets_withheld`: a scoped run, or a step that does not need
    them (required secrets may then be absent). Raises `StageConfigError`."""
    return _parse(model, raw, {"open_with": settings, "secrets_withheld": secrets_withheld})


class JobConfigs(Generic[AnyConfig]):
    """A service's `read_stage_config`, once per job: the items of a job share one config, so a
    sealed csv mapping is opened once rather than once per item. Keeps the last `keep` jobs."""

    def __init__(self, model: type[AnyConfig], keep: int = 16) -> None:
        self.model: type[AnyConfig] = model
        self.keep = keep
        self._read: dict[tuple[uuid.UUID, bool], AnyConfig] = {}

    def read(
        self,
        job_id: uuid.UUID,
        raw: Mapping[str, Any] | None,
        settings: Settings,
        *,
        secrets_withheld: bool = False,
    ) -> AnyConfig:
        key = (job_id, secrets_withheld)
        if key not in self._read:
            config = read_stage_config(self.model, raw, settings, secrets_withheld=secrets_withheld)
            while len(self._read) >= self.keep:
                del self._read[next(iter(self._read))]
            self._read[key] = config
        return self._read[key]


# --- storing and sending -------------------------------------------------------------------------


def public_config(config: StageConfig) -> dict[str, Any]:
    """The config as the gateway stores and shows it: as given, secrets as `"***"`.

    Only what the user set: the defaults stay here, so the stored config never pins them."""
    return config.model_dump(mode="json", exclude_unset=True)


def event_config(config: StageConfig, settings: Settings) -> dict[str, Any]:
    """The config as the stage service receives it: as given, secrets sealed (`sealed:v1:...`).

    Raises `shared.secrets.SecretError` when there is a secret to pass but no project secret.
    """
    data = config.model_dump(mode="json", exclude_unset=True, context={"reveal_secrets": True})
    return dict(seal_config(data, settings))  # seals every SECRET_FIELDS value


def _secret_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("writeOnly"):
            names.add(name)
        for arg in (field.annotation, *get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _secret_names(arg)
    return names


SECRET_FIELDS = frozenset(name for model in CONFIG_MODELS.values() for name in _secret_names(model))
"""The names of every secret field of a stage config (their values are never kept)."""


def without_secrets(config: Any) -> Any:
    """A stored (redacted) config with its secret keys left out altogether."""
    if isinstance(config, dict):
        return {k: without_secrets(v) for k, v in config.items() if k not in SECRET_FIELDS}
    if isinstance(config, list):
        return [without_secrets(v) for v in config]
    return config


def scoped_run_config(previous: dict[str, Any] | None) -> dict[str, Any]:
    """The config of a scoped "new study" run: the cohort's last config for the stage, or none.

    A scoped run has no user at hand to type a secret, so secrets are left out (the anonymizer then
    records the study's audit rows without writing a new encrypted audit export).
    """
    return dict(without_secrets(previous)) if previous is not None else {}
