"""One function per consumed message: progress, completion and failure of stage runs, and "new
study" notices (from Kafka or from `POST /api/studies`, through the same `receive_study`).

Each applies its event in one transaction, under the cohort lock. Completion, failure and study
events are recorded in the inbox so a redelivery changes nothing; progress is naturally idempotent
(counters only grow, a status only moves forward).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Literal

import asyncpg
from prometheus_client import Counter
from pydantic import ValidationError

from services.gateway import repository as repo
from services.gateway.cohorts.progress import job_progress, merge_job_errors
from services.gateway.errors import Invalid, NotFound
from services.gateway.runs import RunStarted, start_study_run
from shared.events import (
    Envelope,
    JobHeartbeat,
    JobProgress,
    StageCompleted,
    StageFailed,
    StudyReceived,
    work_left_behind,
)
from shared.observability import REGISTRY
from shared.settings import Settings
from shared.sources import SourceError, check_location
from shared.topics import Stage

log = logging.getLogger(__name__)

EVENTS_CONSUMED = Counter(
    "cohortflow_gateway_events_total",
    "Events consumed by the gateway, by type and outcome (applied, skipped, retried)",
    ["type", "outcome"],
    registry=REGISTRY,
)


async def _job_under_lock(
    conn: asyncpg.Connection, job_id: uuid.UUID | None
) -> asyncpg.Record | None:
    """The job, locked after its cohort (the lock order of `repository`)."""
    if job_id is None:
        return None
    job = await repo.get_job(conn, job_id)
    if job is None:
        return None
    await repo.lock_cohort(conn, job["cohort_id"])
    return await repo.get_job(conn, job_id, for_update=True)


def _counts(job: asyncpg.Record, total: int, done: int, failed: int) -> dict[str, int]:
    return {
        "items_total": max(job["items_total"], total),
        "items_done": max(job["items_done"], done),
        "items_failed": max(job["items_failed"], failed),
    }


async def apply_progress(pool: asyncpg.Pool, envelope: Envelope) -> None:
    """Counters, errors and partial summary of a running job; its first progress starts it."""
    progress = envelope.open(JobProgress)
    async with pool.acquire() as conn, conn.transaction():
        job = await _job_under_lock(conn, envelope.job_id)
        if job is None:
            log.info("progress for an unknown job ignored", extra={"job_id": str(envelope.job_id)})
            return
        if job["status"] in repo.TERMINAL:
            return  # late progress never reopens an ended job
        counts = _counts(job, progress.items_total, progress.items_done, progress.items_failed)
        await repo.set_job_state(
            conn,
            job,
            status="running",
            reason="first progress from the stage workers",
            event_id=envelope.id,
            progress=job_progress(
                counts["items_total"], counts["items_done"], counts["items_failed"]
            ),
            errors=merge_job_errors(job["errors"], [e.model_dump() for e in progress.errors]),
            summary={**job["summary"], **progress.summary},
            **counts,
        )
        await repo.heard_from(conn, job["id"])
        if job["stage"] == Stage.extraction.value and progress.summary:
            await repo.set_cohort_totals(conn, job["cohort_id"], progress.summary, exact=False)
        await repo.refresh_cohort_status(conn, job["cohort_id"])


async def apply_heartbeat(pool: asyncpg.Pool, envelope: Envelope) -> None:
    """A stage service is at work on these jobs: each is stamped as heard from (one statement
    each, no cohort lock: it touches only the job's own row)."""
    beat = envelope.open(JobHeartbeat)
    async with pool.acquire() as conn:
        for job_id in beat.job_ids:
            await repo.heard_from(conn, job_id)


async def apply_completed(pool: asyncpg.Pool, envelope: Envelope) -> None:
    """A stage run ended well: its job is completed; extraction's summary sets cohort metrics.

    The next job of the routing slip stays pending until its own first progress arrives.
    """
    done = envelope.open(StageCompleted)
    async with pool.acquire() as conn, conn.transaction():
        if not await repo.claim_event(conn, envelope.id, envelope.type):
            return
        job = await _job_under_lock(conn, envelope.job_id)
        if job is None:
            log.info(
                "completion for an unknown job ignored", extra={"job_id": str(envelope.job_id)}
            )
            return
        counts = _counts(job, done.items_total, done.items_done, done.items_failed)
        # a job the user cancelled stays cancelled, but keeps what its run reported
        status = None if job["status"] == "cancelled" else "completed"
        summary = {**job["summary"], **done.summary}
        behind = work_left_behind(done.items_total, done.items_failed, summary)
        await repo.set_job_state(
            conn,
            job,
            status=status,
            reason=behind or "the stage reported its run completed",
            event_id=envelope.id,
            progress=100.0,
            summary=summary,
            output_prefix=done.output_prefix,
            errors=merge_job_errors(job["errors"], [e.model_dump() for e in done.errors]),
            **counts,
        )
        if done.stage is Stage.extraction:
            await repo.set_cohort_totals(conn, job["cohort_id"], done.summary, exact=True)
        await repo.refresh_cohort_status(conn, job["cohort_id"])


async def apply_failed(pool: asyncpg.Pool, envelope: Envelope) -> None:
    """A stage run failed: its job is failed and the rest of its run is cancelled, with the reason."""
    failure = envelope.open(StageFailed)
    async with pool.acquire() as conn, conn.transaction():
        if not await repo.claim_event(conn, envelope.id, envelope.type):
            return
        job = await _job_under_lock(conn, envelope.job_id)
        if job is None:
            log.info("failure for an unknown job ignored", extra={"job_id": str(envelope.job_id)})
            return
        counts = _counts(job, failure.items_total, failure.items_done, failure.items_failed)
        status = None if job["status"] == "cancelled" else "failed"
        await repo.set_job_state(
            conn,
            job,
            status=status,
            reason=failure.error,
            event_id=envelope.id,
            errors=merge_job_errors(job["errors"], [e.model_dump() for e in failure.errors]),
            progress=job_progress(
                counts["items_total"], counts["items_done"], counts["items_failed"]
            ),
            **counts,
        )
        reason = f"{failure.stage.value} failed: {failure.error}"
        slip_jobs = {step.job_id for step in failure.slip}
        for later in await repo.later_jobs_of_run(conn, job):
            slip_jobs.discard(later["id"])
            await repo.set_job_state(
                conn, later, status="cancelled", reason=reason, event_id=envelope.id
            )
        for job_id in slip_jobs:  # slip steps of another run (should not happen): cancel too
            other = await repo.get_job(conn, job_id, for_update=True)
            if other is not None and other["status"] in repo.ACTIVE:
                await repo.set_job_state(
                    conn, other, status="cancelled", reason=reason, event_id=envelope.id
                )
        await repo.refresh_cohort_status(conn, job["cohort_id"])


# --- new studies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyAccepted:
    cohort_id: uuid.UUID
    study_instance_uid: str
    location: str
    run: RunStarted | None


async def receive_study(
    pool: asyncpg.Pool,
    settings: Settings,
    study: StudyReceived,
    origin: Literal["http", "kafka"],
    event_id: uuid.UUID | None = None,
) -> StudyAccepted:
    """Add a study to its cohort and run the pipeline for that study only.

    The cohort is `study.cohort` (a name or an id), or else the one cohort whose source_path
    contains the study's location. Raises `Invalid` (no cohort found that way, bad location) or
    `NotFound` (no such cohort); a refusal is recorded in `gateway.received_studies` too.
    """
    async with pool.acquire() as conn, conn.transaction():
        if event_id is not None and not await repo.claim_event(conn, event_id, "StudyReceived"):
            raise _Duplicate()
        try:
            cohort, location = await _study_target(conn, settings, study)
        except (Invalid, NotFound) as exc:
            refused: Invalid | NotFound = exc
        else:
            run = None
            if study.run_pipeline:
                run = await start_study_run(conn, cohort, study.study_instance_uid, location)
            await repo.record_received_study(
                conn,
                event_id=event_id,
                cohort_id=cohort["id"],
                study_instance_uid=study.study_instance_uid,
                location=location,
                origin=origin,
                run_id=run.run_id if run else None,
                refused_reason=None,
            )
            return StudyAccepted(cohort["id"], study.study_instance_uid, location, run)
        # the refusal is committed (and the event claimed): a retry could not make it acceptable
        await repo.record_received_study(
            conn,
            event_id=event_id,
            cohort_id=None,
            study_instance_uid=study.study_instance_uid,
            location=study.location,
            origin=origin,
            run_id=None,
            refused_reason=str(refused),
        )
    raise refused


class _Duplicate(Exception):
    """A redelivered study event, already handled."""


async def _study_target(
    conn: asyncpg.Connection, settings: Settings, study: StudyReceived
) -> tuple[asyncpg.Record, str]:
    if not study.study_instance_uid.strip():
        raise Invalid("study_instance_uid is empty")
    try:
        location = check_location(study.location, settings)
    except (SourceError, ValueError, OSError) as exc:  # NUL bytes, names too long, ...
        raise Invalid(f"location: {exc}") from exc
    if study.cohort:
        found = await repo.find_cohort(conn, study.cohort)
        if found is None:
            raise NotFound(f"no cohort named or numbered {study.cohort!r}")
    else:
        # the ingest rule: a study dropped inside a cohort's source folder belongs to that cohort
        containing = await repo.cohorts_containing(conn, location)
        if len(containing) != 1:
            raise Invalid(
                "no cohort given and "
                + ("none" if not containing else f"{len(containing)} cohorts")
                + " have a source_path containing the location: name the cohort (name or id)"
            )
        found = containing[0]
    cohort = await repo.lock_cohort(conn, found["id"])
    assert cohort is not None
    return cohort, location


async def on_study_received(pool: asyncpg.Pool, settings: Settings, envelope: Envelope) -> None:
    """`cohortflow.studies.received`: like `POST /api/studies`; a refused study is logged and
    recorded (retrying cannot make it acceptable), never retried forever."""
    try:
        study = envelope.open(StudyReceived)
    except (ValueError, ValidationError) as exc:
        log.error(
            "unreadable StudyReceived refused",
            extra={"event_id": str(envelope.id), "error": str(exc)},
        )
        return
    try:
        accepted = await receive_study(pool, settings, study, "kafka", envelope.id)
    except _Duplicate:
        return
    except (Invalid, NotFound) as refusal:
        log.warning("study refused", extra={"event_id": str(envelope.id), "reason": str(refusal)})
        return
    log.info(
        "study received",
        extra={
            "cohort_id": str(accepted.cohort_id),
            "run_id": str(accepted.run.run_id) if accepted.run else None,
        },
    )


async def on_event(pool: asyncpg.Pool, settings: Settings, envelope: Envelope) -> None:
    """Dispatch a consumed envelope by its type; unknown types are skipped (newer producers).

    An event that can never apply (a payload that does not validate, values the tables refuse) is
    logged and skipped rather than redelivered forever; anything else (the database away) raises,
    so the message comes back.
    """
    try:
        if envelope.type == JobProgress.__name__:
            await apply_progress(pool, envelope)
        elif envelope.type == JobHeartbeat.__name__:
            await apply_heartbeat(pool, envelope)
        elif envelope.type == StageCompleted.__name__:
            await apply_completed(pool, envelope)
        elif envelope.type == StageFailed.__name__:
            await apply_failed(pool, envelope)
        elif envelope.type == StudyReceived.__name__:
            await on_study_received(pool, settings, envelope)
        else:
            log.info("event type not for the gateway", extra={"type": envelope.type})
            EVENTS_CONSUMED.labels(envelope.type[:64], "skipped").inc()
            return
    except (
        ValidationError,
        asyncpg.DataError,
        asyncpg.IntegrityConstraintViolationError,
    ) as exc:
        log.error(
            "event skipped: it cannot be applied",
            extra={"event_id": str(envelope.id), "type": envelope.type, "error": str(exc)[:500]},
        )
        EVENTS_CONSUMED.labels(envelope.type[:64], "skipped").inc()
        return
    except Exception:
        EVENTS_CONSUMED.labels(envelope.type[:64], "retried").inc()
        raise
    EVENTS_CONSUMED.labels(envelope.type, "applied").inc()
