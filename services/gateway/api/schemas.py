"""The JSON shapes of the public HTTP API (served as /api/openapi.json); field names are the user's vocabulary."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
)

from services.gateway.cohorts.stage_order import StageState, applicable_stages
from shared.events import work_left_behind
from shared.topics import Stage

_NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f]+$"
CohortName = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=128, pattern=r"^[^/\\\x00-\x1f]+$"
    ),
]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
# Postgres OFFSET is a bigint: a larger one is bad input (422 from validation), not a database error
MAX_OFFSET = 2**63 - 1
CohortStatusName = Literal["idle", "in_progress", "completed"]
JobStatusName = Literal["pending", "running", "completed", "failed", "cancelled"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_a_uuid(name: str | None) -> str | None:
    if name is not None:
        try:
            uuid.UUID(name)
        except ValueError:
            return name
        raise ValueError("a cohort name may not look like an id (a UUID)")
    return name


class PipelineRequest(_Input):
    """Per-stage configs; a stage left out runs with its defaults."""

    anonymization: dict[str, Any] | None = None
    extraction: dict[str, Any] | None = None
    sorting: dict[str, Any] | None = None
    export: dict[str, Any] | None = None

    def configs(self) -> dict[Stage, dict[str, Any] | None]:
        return {stage: getattr(self, stage.value) for stage in Stage}


class CohortCreate(_Input):
    name: CohortName
    source_path: str = Field(min_length=1, max_length=4096, pattern=_NO_CONTROL_CHARACTERS)
    description: str = Field(default="", max_length=10000)
    owner: str = Field(default="", max_length=256)
    tags: list[Tag] = Field(default_factory=list, max_length=100)
    anonymization_enabled: bool = False
    study_quiet_period_s: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="a new study whose sender does not say it is complete starts once its files"
        " have not changed for this long (0: at once)",
    )
    pipeline: PipelineRequest | None = Field(
        default=None,
        description="start the pipeline with these stage configs in the same transaction: a"
        " config that is refused (422) creates no cohort",
    )

    _name = field_validator("name")(_not_a_uuid)


class CohortPatch(_Input):
    name: CohortName | None = None
    source_path: str | None = Field(
        default=None, min_length=1, max_length=4096, pattern=_NO_CONTROL_CHARACTERS
    )
    description: str | None = Field(default=None, max_length=10000)
    owner: str | None = Field(default=None, max_length=256)
    tags: list[Tag] | None = Field(default=None, max_length=100)
    anonymization_enabled: bool | None = None
    study_quiet_period_s: int | None = Field(default=None, ge=0, le=86400)

    _name = field_validator("name")(_not_a_uuid)


class StageOut(BaseModel):
    stage: Stage
    state: StageState = StageState.not_started
    job_id: uuid.UUID | None = None
    progress: float = 0.0


class CohortOut(BaseModel):
    id: uuid.UUID
    name: str
    source_path: str
    description: str
    owner: str
    tags: list[str]
    anonymization_enabled: bool
    study_quiet_period_s: int
    status: CohortStatusName
    total_subjects: int
    total_sessions: int
    total_series: int
    total_instances: int
    completion_percentage: float
    created_at: datetime
    updated_at: datetime
    stages: list[StageOut]

    @classmethod
    def from_rows(
        cls, cohort: asyncpg.Record, stage_jobs: dict[Stage, asyncpg.Record]
    ) -> CohortOut:
        stages = []
        for stage in applicable_stages(cohort["anonymization_enabled"]):
            job = stage_jobs.get(stage)
            stages.append(
                StageOut(stage=stage)
                if job is None
                else StageOut(
                    stage=stage,
                    state=StageState(job["status"]),
                    job_id=job["id"],
                    progress=job["progress"],
                )
            )
        return cls(**{k: cohort[k] for k in cls.model_fields if k != "stages"}, stages=stages)


class StageRunRequest(_Input):
    config: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    item: str
    message: str


class JobOut(BaseModel):
    id: uuid.UUID
    cohort_id: uuid.UUID
    run_id: uuid.UUID
    stage: Stage
    status: JobStatusName
    status_reason: str | None
    scoped: bool
    progress: float
    items_total: int
    items_done: int
    items_failed: int
    errors: list[JobError]
    summary: dict[str, Any]
    config: dict[str, Any] = Field(description="the stage config as given, secrets as ***")
    output_prefix: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @computed_field(  # type: ignore[prop-decorator]
        description="true when the job completed but left work behind (status_reason says what)"
    )
    @property
    def left_work_behind(self) -> bool:
        return self.status == "completed" and (
            work_left_behind(self.items_total, self.items_failed, self.summary) is not None
        )

    @classmethod
    def from_row(cls, job: asyncpg.Record) -> JobOut:
        return cls(**{k: job[k] for k in cls.model_fields})


class JobEventOut(BaseModel):
    from_status: JobStatusName | None
    to_status: JobStatusName
    reason: str | None
    event_id: uuid.UUID | None
    at: datetime


class RunOut(BaseModel):
    run_id: uuid.UUID
    cohort_id: uuid.UUID
    jobs: list[JobOut]


class StackOut(BaseModel):
    stack_key: str
    n_instances: int | None
    n_frames: int | None = None
    base: str | None = None
    technique: str | None = None
    modifiers: list[str] | None = None
    constructs: list[str] | None = None
    provenance: str | None = None
    acceleration: list[str] | None = None
    post_contrast: bool | None = None
    localizer: bool | None = None
    spinal_cord: bool | None = None
    intent: str | None = None
    bids_datatype: str | None = None
    bids_suffix: str | None = None
    entities: dict[str, Any] | None = None
    confidence: float | None = None
    review_required: bool | None = None
    review_reasons: list[str] | None = None
    excluded_reason: str | None = None
    set_by: Literal["sorter", "person"] | None = Field(
        default=None, description="who named the stack: the sorter, or a person's mapping rule"
    )
    rule_version: int | None = None
    proposed: dict[str, Any] | None = Field(
        default=None, description="the sorter's proposal (datatype, suffix, entities, intent)"
    )


class SeriesOut(BaseModel):
    series_instance_uid: str
    description: str | None
    modality: str | None
    series_number: int | None
    subject_id: str | None
    study_instance_uid: str | None
    n_instances: int | None
    stacks: list[StackOut]


class ExportFileOut(BaseModel):
    path: str
    kind: str | None
    size: int | None
    sha256: str | None
    series_instance_uid: str | None
    stack_key: str | None
    source_sop_instance_uids: list[str] | None
    download_url: str = Field(
        description="the file's link; with an API token, signed and valid for an hour (opens in a new tab)"
    )


class ExportOut(BaseModel):
    cohort_id: uuid.UUID
    job_id: uuid.UUID
    status: JobStatusName
    files: list[ExportFileOut]


class StudyAcceptedOut(BaseModel):
    cohort_id: uuid.UUID
    study_instance_uid: str
    location: str
    outcome: Literal["accepted", "duplicate", "waiting", "retracted"] = Field(
        description="accepted: this notice started the run (or none was asked for); duplicate:"
        " an earlier notice (`duplicate_of`) already brought these files, nothing new started;"
        " waiting: the sender did not say the study is complete, so its run starts once its"
        " files have not changed for the cohort's `study_quiet_period_s`; retracted: a"
        " `study.retracted` notice, the study is left out of the cohort's next export"
    )
    notice: int | None = Field(None, description="this notice's `seq` in GET /api/studies")
    duplicate_of: int | None = Field(None, description="the earlier notice's `seq`")
    run_id: uuid.UUID | None
    jobs: list[JobOut]


class ReceivedStudyOut(BaseModel):
    seq: int
    event_id: uuid.UUID | None
    cohort_id: uuid.UUID | None
    study_instance_uid: str
    location: str
    origin: Literal["http", "kafka"] = Field(description="the channel the notice came by")
    outcome: Literal["accepted", "duplicate", "refused", "waiting", "retracted"]
    run_id: uuid.UUID | None
    refused_reason: str | None
    duplicate_of: int | None
    notice_source: str | None = Field(description="the CloudEvent `source`, if it was one")
    notice_id: str | None = Field(description="the CloudEvent `id`")
    notice_type: str | None = Field(description="the CloudEvent `type`")
    sender: dict[str, Any] | None = Field(description="the sending system and its AE titles")
    expected_instances: int | None
    complete: bool | None
    files: int | None = Field(description="files found at the location when the notice came")
    received_at: datetime


DeadLetterStatus = Literal["open", "replayed", "discarded"]


class DeadLetterOut(BaseModel):
    id: uuid.UUID
    stage: Stage
    kind: Literal["item", "plan", "message"] = Field(
        description="item: a work item; plan: a run's request whose plan could not be made or"
        " stored; message: a message that was no valid envelope or payload (discard only)"
    )
    topic: str = Field(description="the topic the message given up on was consumed from")
    cohort_id: uuid.UUID | None
    job_id: uuid.UUID | None
    correlation_id: uuid.UUID | None = Field(description="the pipeline run it belonged to")
    item_key: str | None
    error: str
    attempts: int
    source: str
    status: DeadLetterStatus
    replay_run_id: uuid.UUID | None
    note: str | None
    dead_at: datetime
    received_at: datetime
    resolved_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> DeadLetterOut:
        return cls(**{k: row[k] for k in cls.model_fields})


class DeadLetterDetail(DeadLetterOut):
    original: dict[str, Any] = Field(description="the payload given up on, as it was sent")


class DiscardIn(BaseModel):
    note: str | None = Field(default=None, max_length=2000, description="why it is set aside")
