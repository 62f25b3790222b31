"""The versioned event envelope and the payloads every service agrees on.

Every Kafka message is an `Envelope` serialized as JSON:
`{id, type, version, time, source, correlation_id, cohort_id, job_id, payload}`.
`type` names the payload model (`StageRequested`, ...); `version` is that payload's schema version.
Consumers accept unknown extra fields so that producers can add fields without breaking them.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from shared.topics import Stage

ENVELOPE_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Payload(BaseModel):
    """Base of every event payload; unknown fields are kept so producers can add fields."""

    model_config = ConfigDict(extra="allow")


P = TypeVar("P", bound=Payload)


class WrongPayload(ValueError):
    """An envelope whose `type` is not the payload its consumer expects (no retry can fix it)."""


class Envelope(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str
    version: int = ENVELOPE_VERSION
    time: datetime = Field(default_factory=utcnow)
    source: str
    # the pipeline run (the gateway's `run_id`) the event belongs to, carried unchanged through
    # every stage's items, progress, completion and the next stage's request; None outside a run
    correlation_id: uuid.UUID | None = None
    cohort_id: uuid.UUID | None = None
    # the stage job the event is about (one per stage of a run)
    job_id: uuid.UUID | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    subject: str | None = None  # outbound CloudEvents only: what the event is about

    @classmethod
    def wrap(
        cls,
        payload: Payload,
        *,
        source: str,
        cohort_id: uuid.UUID | None = None,
        job_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
    ) -> Envelope:
        return cls(
            type=type(payload).__name__,
            source=source,
            cohort_id=cohort_id,
            job_id=job_id,
            correlation_id=correlation_id,
            payload=payload.model_dump(mode="json"),
        )

    def open(self, model: builtins.type[P]) -> P:
        """The payload as its model; raises `WrongPayload` (a `ValueError`) when the type does not
        match, pydantic's `ValidationError` when the payload is not valid."""
        if self.type != model.__name__:
            raise WrongPayload(f"expected a {model.__name__} event, got {self.type}")
        return model.model_validate(self.payload)


# --- outbound: CloudEvents for other systems -------------------------------------------------

CLOUDEVENT_TYPE_PREFIX = "org.cohortflow."


def cloudevent_type(name: str) -> str:
    """`job.completed` -> `org.cohortflow.job.completed.v1`."""
    return f"{CLOUDEVENT_TYPE_PREFIX}{name}.v1"


def is_cloudevent_type(event_type: str) -> bool:
    return event_type.startswith(CLOUDEVENT_TYPE_PREFIX)


def cloudevent(
    name: str, data: dict[str, Any], *, source: str, subject: str, cohort_id: uuid.UUID | None
) -> Envelope:
    """An event for other systems (`cohortflow.events`, webhooks): the envelope's `id`, `source`,
    `time` and `subject` become the CloudEvent's attributes, `payload` its data."""
    return Envelope(
        type=cloudevent_type(name),
        source=source,
        cohort_id=cohort_id,
        payload=data,
        subject=subject,
    )


# --- pipeline -------------------------------------------------------------------------------


class CohortRef(BaseModel):
    """What a stage needs to know about the cohort it works for."""

    model_config = ConfigDict(extra="allow")
    id: uuid.UUID
    name: str
    source_path: str
    anonymization_enabled: bool = False


class SlipStep(BaseModel):
    """One stage still to run in a pipeline run (the routing slip)."""

    stage: Stage
    job_id: uuid.UUID
    config: dict[str, Any] = Field(default_factory=dict)


class StageRequested(Payload):
    """A stage run was asked for. `slip` lists the stages to run after this one, in order."""

    stage: Stage
    cohort: CohortRef
    config: dict[str, Any] = Field(default_factory=dict)
    slip: list[SlipStep] = Field(default_factory=list)
    # scope: limit the run to these studies (incremental "new study" runs); empty = whole cohort
    study_instance_uids: list[str] = Field(default_factory=list)
    # where the previous stage left its output (object prefix), when it matters to this stage
    input_prefix: str | None = None
    # read this location instead of the cohort's source_path (a new study's folder or s3:// prefix)
    location: str | None = None
    # streamed pipeline run (ADR 0023): this run hands its studies on as they pass it, and its
    # end closes the next stage's run (which exists from the start) instead of requesting it
    streamed: bool = False
    # an open run of a streamed pipeline: created now, its studies arrive by `StudiesPassed`
    upstream_open: bool = False
    # where, under `input_prefix`, the scoped studies' objects are (a streamed hand-over of
    # studies laid out one prefix each, e.g. the de-identified zone); empty = anywhere
    study_prefixes: list[str] = Field(default_factory=list)


class StudiesPassed(Payload):
    """Studies that passed the stage before `stage` in a streamed pipeline run (ADR 0023), sent
    on `stage`'s requested topic (keyed by cohort, so it follows the run's own request) to its open
    run (the envelope's `job_id`). The last one of the upstream run is `closed`: it carries the
    request's scope and the upstream's output prefix, as the routing slip's `StageRequested` does
    in a run that is not streamed, and after it no more studies come. `abandoned`: the upstream
    run failed (why); the open run ends cancelled, as the gateway already shows it."""

    stage: Stage
    cohort: CohortRef
    # as the next stage knows them (de-identified UIDs past anonymization)
    study_instance_uids: list[str] = Field(default_factory=list)
    # where, under `input_prefix`, these studies' objects are (when the stage lays them out so)
    study_prefixes: list[str] = Field(default_factory=list)
    input_prefix: str | None = None
    closed: bool = False
    abandoned: str | None = None


class WorkItem(Payload):
    """One unit of a run's work, shared among a stage's replicas through a consumer group.

    Its attempts are counted in the item's row (`run_items.attempts`), not in the message: a
    redelivered message is the same message, and a worker killed mid-item never sends another."""

    stage: Stage
    cohort: CohortRef
    item_key: str
    config: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)


class ItemError(BaseModel):
    item: str
    message: str


class StageCompleted(Payload):
    stage: Stage
    cohort: CohortRef
    items_total: int
    items_done: int
    items_failed: int
    summary: dict[str, Any] = Field(default_factory=dict)
    output_prefix: str | None = None
    slip: list[SlipStep] = Field(default_factory=list)
    # the failed items' errors (a completed run may have some), so the job has them all at once
    errors: list[ItemError] = Field(default_factory=list)


def work_left_behind(items_total: int, items_failed: int, summary: dict[str, Any]) -> str | None:
    """Why a completed run is not a clean success, or None when it did everything asked.

    Completed means the run reached its end; it still left work behind when any item failed or
    when its stage reports `left_behind` units in its summary (the anonymizer's files that were
    refused or withdrawn), with `left_behind_unit` naming them and `refused` grouping the reasons.
    """
    parts = []
    left = int(summary.get("left_behind") or 0)
    if left:
        unit = str(summary.get("left_behind_unit") or "files")
        parts.append(f"{left} {unit} left behind")
        groups = summary.get("refused") or []
        if groups:
            top = "; ".join(
                f"{g.get('reason')} ({g.get('files')} in {g.get('studies')} studies)"
                for g in groups[:3]
            )
            parts.append(
                f"by reason: {top}" + (f"; {len(groups) - 3} more" if len(groups) > 3 else "")
            )
    if items_failed:
        parts.append(f"{items_failed} of {items_total} work items failed")
    return "completed with work left behind: " + ", ".join(parts) if parts else None


class StageFailed(Payload):
    stage: Stage
    cohort: CohortRef
    error: str
    items_total: int = 0
    items_done: int = 0
    items_failed: int = 0
    errors: list[ItemError] = Field(default_factory=list)
    slip: list[SlipStep] = Field(default_factory=list)


JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


class JobProgress(Payload):
    """Throttled progress of a run, from its workers to the gateway."""

    stage: Stage
    status: JobStatus = "running"
    items_total: int = 0
    items_done: int = 0
    items_failed: int = 0
    errors: list[ItemError] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict)
    # an open run of a streamed pipeline (ADR 0023): more studies, hence items, are still to come
    upstream_open: bool = False


class JobHeartbeat(Payload):
    """A stage service is at work on these runs (or on others they wait behind): sent while it
    holds an item, a plan or a finalize, every `heartbeat_interval_s`: a long one is no stall."""

    stage: Stage
    job_ids: list[uuid.UUID]


class JobControl(Payload):
    action: Literal["cancel"]
    reason: str = ""


class CohortDeleted(Payload):
    """A cohort is gone from the gateway; each stage service removes what it holds of it (its
    schema's rows, its zone's objects). Audit exports and users' export destinations stay."""

    cohort_id: uuid.UUID


# --- ingest from other systems ------------------------------------------------------------------


class StudyOrigin(BaseModel):
    """Where a "new study" notice comes from: the sending system and the DICOM association."""

    model_config = ConfigDict(extra="allow")
    system: str | None = Field(
        default=None, description="the sending system (router, PACS, gateway)"
    )
    calling_ae: str | None = Field(default=None, description="AE title of the modality or sender")
    called_ae: str | None = Field(default=None, description="AE title that received the study")
    host: str | None = Field(default=None, description="host the association came from")


class StudyReceived(Payload):
    """A hospital system (PACS router, Orthanc, RIS) says a new study is available.

    `location` is a local folder under an allowed root or an `s3://bucket/prefix` holding the study's
    DICOM files. The gateway matches it to a cohort by `cohort` (name or id) or by its ingest rules
    and runs the pipeline for that study only. `patient_id` and `accession_number` help the sender
    correlate; they are never stored or logged by the gateway.
    """

    study_instance_uid: str
    location: str
    cohort: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    modalities: list[str] = Field(default_factory=list)
    run_pipeline: bool = True
    expected_instances: int | None = Field(
        default=None, ge=0, description="how many instances the sender holds for the study"
    )
    complete: bool | None = Field(
        default=None, description="true when the sender asserts the study has arrived in full"
    )
    origin: StudyOrigin | None = None
    study_description: str | None = Field(
        default=None, description="for the cohorts' routing rules"
    )
    institution: str | None = Field(default=None, description="InstitutionName, for routing rules")


class StudyRetraction(Payload):
    """The gateway to the anonymizer: a study of an anonymized cohort was retracted (or announced
    available again). Only the anonymizer knows which de-identified study an original
    StudyInstanceUID became, so it records the retraction under the new UID (ADR 0025).
    `study_instance_uid` is the original, sealed (`shared.secrets.seal`): the outbox and the
    broker's log never hold it in clear. No free-text reason travels: a sender's words may name
    the patient."""

    study_instance_uid: str = Field(description="the original StudyInstanceUID, sealed")
    retracted: bool = Field(description="true: leave it out of exports; false: take that back")
    reason: str = Field(description="what the export says, e.g. `retracted by <source>`")
    notice: int | None = Field(default=None, description="the notice's row at the gateway")


class DeadLetter(Payload):
    """A message that failed after bounded retries, with the error, for a person to look at."""

    topic: str
    error: str
    attempts: int
    original: dict[str, Any]


# --- outbound: the data of the CloudEvents other systems receive -------------------------------


class JobEvent(Payload):
    """`job.started`, `job.completed`, `job.failed`, `job.cancelled` (subject: the job id)."""

    job_id: uuid.UUID
    cohort_id: uuid.UUID
    run_id: uuid.UUID
    stage: Stage
    status: JobStatus
    reason: str | None = None
    scoped: bool = False
    items_total: int = 0
    items_done: int = 0
    items_failed: int = 0
    left_work_behind: bool = Field(
        default=False, description="completed, but some work was not done (reason says what)"
    )


class ExportPublished(Payload):
    """`export.published`: an export job completed (subject: the job id)."""

    job_id: uuid.UUID
    cohort_id: uuid.UUID
    scoped: bool = False
    output_prefix: str | None = Field(
        default=None, description="where the tree is in the data bucket"
    )
    files_api: str = Field(description="the gateway path that lists and serves the files")
    validator: dict[str, Any] = Field(
        default_factory=dict, description="the BIDS validator's verdict and counts"
    )
    summary: dict[str, Any] = Field(default_factory=dict, description="the export's counts")


class StudyNoticeEvent(Payload):
    """`study.accepted`, `study.refused` (subject: the StudyInstanceUID the sender gave)."""

    notice: int = Field(description="the notice's `seq` in GET /api/studies")
    study_instance_uid: str
    cohort_id: uuid.UUID | None = None
    location: str
    run_id: uuid.UUID | None = None
    reason: str | None = None


# what each outbound event name carries
OUTBOUND_EVENTS: dict[str, type[Payload]] = {
    "job.started": JobEvent,
    "job.completed": JobEvent,
    "job.failed": JobEvent,
    "job.cancelled": JobEvent,
    "export.published": ExportPublished,
    "study.accepted": StudyNoticeEvent,
    "study.refused": StudyNoticeEvent,
}
