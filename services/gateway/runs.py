"""Starting stage runs, pipelines and scoped "new study" runs, and cancelling jobs.

Each operation is one transaction: the cohort row is locked, the stage order is checked against its
jobs, the jobs are written, and the first stage's `StageRequested` (or the `JobControl`s of a cancel)
goes into the outbox with them, so a request is never recorded without its event, nor the reverse.
The stage services advance the routing slip; the gateway only records what they report.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.gateway import SCHEMA
from services.gateway import repository as repo
from services.gateway.cohorts.stage_order import (
    StageOrderError,
    applicable_stages,
    check_stage_run,
    previous_stage,
    remaining_stages,
)
from services.gateway.errors import Conflict, NotFound
from shared import topics
from shared.events import CohortRef, Envelope, JobControl, SlipStep, StageRequested
from shared.outbox import enqueue
from shared.settings import Settings
from shared.stage_config import (
    StageConfig,
    StageConfigError,
    event_config,
    public_config,
    scoped_run_config,
    validate_stage_config,
)
from shared.topics import Stage

SOURCE = "gateway"


@dataclass(frozen=True)
class RunStarted:
    run_id: uuid.UUID
    jobs: list[asyncpg.Record]


@dataclass(frozen=True)
class _PlannedJob:
    stage: Stage
    job_id: uuid.UUID
    stored_config: dict[str, Any]  # redacted
    sent_config: dict[str, Any]  # secrets sealed


def cohort_ref(cohort: asyncpg.Record) -> CohortRef:
    return CohortRef(
        id=cohort["id"],
        name=cohort["name"],
        source_path=cohort["source_path"],
        anonymization_enabled=cohort["anonymization_enabled"],
    )


async def _locked_cohort(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> asyncpg.Record:
    cohort = await repo.lock_cohort(conn, cohort_id)
    if cohort is None:
        raise NotFound(f"no cohort with id {cohort_id}")
    return cohort


async def _no_study_runs(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> None:
    """A whole-cohort run waits for the new studies' runs in progress: it would read, sort and
    export those studies half-way through their own stages."""
    active = await repo.active_scoped_jobs(conn, cohort_id)
    if active:
        studies = sorted({uid for job in active for uid in job["study_instance_uids"]})
        raise Conflict(
            f"{len(studies)} new stud{'y is' if len(studies) == 1 else 'ies are'} still being"
            f" processed for this cohort ({len(active)} jobs pending or running); wait for"
            " them or cancel them (GET /api/jobs?status=running), then run the cohort"
        )


async def _input_prefix(
    conn: asyncpg.Connection, cohort: asyncpg.Record, stage: Stage
) -> str | None:
    """Where the previous stage left its output, when a run starts after it."""
    before = previous_stage(stage, cohort["anonymization_enabled"])
    if before is None:
        return None
    job = (await repo.latest_stage_jobs(conn, cohort["id"])).get(before)
    return job["output_prefix"] if job is not None else None


async def _write_run(
    conn: asyncpg.Connection,
    cohort: asyncpg.Record,
    kind: str,
    planned: Sequence[_PlannedJob],
    *,
    study_instance_uids: Sequence[str] = (),
    location: str | None = None,
) -> RunStarted:
    """The run, one pending job per planned stage, and the first stage's request in the outbox."""
    scoped = bool(study_instance_uids)
    run_id = await repo.insert_run(conn, cohort["id"], kind, study_instance_uids, location)
    jobs = [
        await repo.insert_job(
            conn,
            job_id=p.job_id,
            cohort_id=cohort["id"],
            run_id=run_id,
            position=index,
            stage=p.stage,
            scoped=scoped,
            config=p.stored_config,
        )
        for index, p in enumerate(planned)
    ]
    first, rest = planned[0], planned[1:]
    request = StageRequested(
        stage=first.stage,
        cohort=cohort_ref(cohort),
        config=first.sent_config,
        slip=[SlipStep(stage=p.stage, job_id=p.job_id, config=p.sent_config) for p in rest],
        study_instance_uids=list(study_instance_uids),
        input_prefix=None if scoped else await _input_prefix(conn, cohort, first.stage),
        location=location,
    )
    envelope = Envelope.wrap(
        request, source=SOURCE, cohort_id=cohort["id"], job_id=first.job_id, correlation_id=run_id
    )
    await enqueue(conn, SCHEMA, topics.requested(first.stage), envelope, key=str(cohort["id"]))
    await repo.refresh_cohort_status(conn, cohort["id"])
    return RunStarted(run_id=run_id, jobs=jobs)


def _plan(stage: Stage, config: StageConfig, settings: Settings) -> _PlannedJob:
    return _PlannedJob(stage, uuid.uuid4(), public_config(config), event_config(config, settings))


async def start_stage(
    pool: asyncpg.Pool,
    settings: Settings,
    cohort_id: uuid.UUID,
    stage: Stage,
    raw_config: Mapping[str, Any] | None,
) -> RunStarted:
    """Run one stage on the whole cohort (409 out of order, 422 bad config)."""
    async with pool.acquire() as conn, conn.transaction():
        cohort = await _locked_cohort(conn, cohort_id)
        await _no_study_runs(conn, cohort_id)
        states = repo.stage_states(await repo.latest_stage_jobs(conn, cohort_id))
        try:
            check_stage_run(stage, cohort["anonymization_enabled"], states)
        except StageOrderError as exc:
            raise Conflict(str(exc)) from exc
        config = validate_stage_config(stage, raw_config, settings)
        return await _write_run(conn, cohort, "stage", [_plan(stage, config, settings)])


async def start_pipeline(
    pool: asyncpg.Pool,
    settings: Settings,
    cohort_id: uuid.UUID,
    raw_configs: Mapping[Stage, Mapping[str, Any] | None],
) -> RunStarted:
    """Run every remaining stage in order: one pending job each, the first one requested."""
    async with pool.acquire() as conn, conn.transaction():
        cohort = await _locked_cohort(conn, cohort_id)
        return await start_pipeline_locked(conn, settings, cohort, raw_configs)


async def start_pipeline_locked(
    conn: asyncpg.Connection,
    settings: Settings,
    cohort: asyncpg.Record,
    raw_configs: Mapping[Stage, Mapping[str, Any] | None],
) -> RunStarted:
    """`start_pipeline` inside a transaction that holds the cohort's lock (or created it)."""
    cohort_id = cohort["id"]
    await _no_study_runs(conn, cohort_id)
    if raw_configs.get(Stage.anonymization) is not None and not cohort["anonymization_enabled"]:
        raise Conflict(
            "anonymization is not enabled on this cohort; drop its config or enable it first"
        )
    states = repo.stage_states(await repo.latest_stage_jobs(conn, cohort_id))
    try:
        stages = remaining_stages(cohort["anonymization_enabled"], states)
    except StageOrderError as exc:
        raise Conflict(str(exc)) from exc
    planned = []
    errors: list[dict[str, Any]] = []
    for stage in applicable_stages(cohort["anonymization_enabled"]):
        try:
            config = validate_stage_config(stage, raw_configs.get(stage), settings)
        except StageConfigError as exc:
            if stage in stages or raw_configs.get(stage) is not None:
                errors += [{**e, "loc": ["body", stage.value, *e["loc"][1:]]} for e in exc.errors]
            continue
        if stage in stages:
            planned.append(_plan(stage, config, settings))
    if errors:
        raise StageConfigError(errors)
    return await _write_run(conn, cohort, "pipeline", planned)


async def start_study_run(
    conn: asyncpg.Connection,
    cohort: asyncpg.Record,
    study_instance_uid: str,
    location: str,
) -> RunStarted:
    """A pipeline run of every applicable stage, scoped to one study read from `location`.

    Runs beside whole-cohort runs (it touches only its study). Each stage reuses the cohort's last
    config for it, secrets left out. Call inside a transaction holding the cohort lock.
    """
    latest = await repo.latest_stage_jobs(conn, cohort["id"])
    planned = []
    for stage in applicable_stages(cohort["anonymization_enabled"]):
        previous = latest[stage]["config"] if stage in latest else None
        config = scoped_run_config(previous)
        planned.append(_PlannedJob(stage, uuid.uuid4(), config, config))
    return await _write_run(
        conn, cohort, "study", planned, study_instance_uids=[study_instance_uid], location=location
    )


async def start_replay(
    conn: asyncpg.Connection,
    settings: Settings,
    job: asyncpg.Record,
    sent_config: dict[str, Any],
) -> RunStarted:
    """A run that redoes an ended job's stage with the config it was sent (`sent_config`, secrets
    sealed) and the scope of its run, then the stages after it (each with the config its
    original run gave it, or the cohort's last, secrets left out). A whole-cohort replay obeys the
    stage order like any whole-cohort run (409). Call inside a transaction holding the cohort
    lock (docs/adr-0022-dead-letters.md)."""
    cohort = await repo.get_cohort(conn, job["cohort_id"])
    if cohort is None:
        raise NotFound(f"no cohort with id {job['cohort_id']}")
    original = await repo.get_run(conn, job["run_id"])
    scope: list[str] = list(original["study_instance_uids"]) if original is not None else []
    location = original["location"] if original is not None else None
    stage = Stage(job["stage"])
    if cohort["anonymization_enabled"] and stage is not Stage.anonymization:
        # past anonymization the original study UIDs name nothing (the slip drops them too):
        # the stage is redone on the cohort, reading what its zone holds
        scope, location = [], None
    if not scope:
        await _no_study_runs(conn, cohort["id"])
        states = repo.stage_states(await repo.latest_stage_jobs(conn, cohort["id"]))
        try:
            check_stage_run(stage, cohort["anonymization_enabled"], states)
        except StageOrderError as exc:
            raise Conflict(str(exc)) from exc
    of_run = {Stage(j["stage"]): j["config"] for j in await repo.jobs_of_run(conn, job["run_id"])}
    latest = await repo.latest_stage_jobs(conn, cohort["id"])
    stages = applicable_stages(cohort["anonymization_enabled"])
    planned = [_PlannedJob(stage, uuid.uuid4(), job["config"], sent_config)]
    for later in stages[stages.index(stage) + 1 :]:
        previous = of_run.get(later) or (latest[later]["config"] if later in latest else None)
        config = scoped_run_config(previous)
        planned.append(_PlannedJob(later, uuid.uuid4(), config, config))
    return await _write_run(
        conn, cohort, "replay", planned, study_instance_uids=scope, location=location
    )


async def cancel_job(
    pool: asyncpg.Pool, job_id: uuid.UUID, reason: str = "cancelled by user"
) -> asyncpg.Record:
    """Cancel a job and the rest of its run; workers get `JobControl` and see `job_control_v`."""
    async with pool.acquire() as conn, conn.transaction():
        job = await repo.get_job(conn, job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        await repo.lock_cohort(conn, job["cohort_id"])
        job = await repo.get_job(conn, job_id, for_update=True)
        assert job is not None
        if job["status"] in repo.TERMINAL:
            raise Conflict(f"job {job_id} has already ended ({job['status']})")
        cancelled = await _cancel(conn, job, reason)
        for later in await repo.later_jobs_of_run(conn, job):
            await _cancel(conn, later, f"{reason} (an earlier stage of its run was cancelled)")
        await repo.refresh_cohort_status(conn, job["cohort_id"])
        return cancelled


async def _cancel(conn: asyncpg.Connection, job: asyncpg.Record, reason: str) -> asyncpg.Record:
    updated = await repo.set_job_state(conn, job, status="cancelled", reason=reason)
    control = Envelope.wrap(
        JobControl(action="cancel", reason=reason),
        source=SOURCE,
        cohort_id=job["cohort_id"],
        job_id=job["id"],
        correlation_id=job["run_id"],
    )
    await enqueue(conn, SCHEMA, topics.JOBS_CONTROL, control, key=str(job["id"]))
    return updated
