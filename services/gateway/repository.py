"""The gateway's tables, read and written on a caller's connection (and so in its transaction).

Lock order, everywhere: the cohort row first (`lock_cohort`), then its jobs. Starting runs, applying
events and cancelling all serialise per cohort this way, so a check ("nothing is running") and the
write that relies on it cannot interleave with another writer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.gateway import outbound
from services.gateway.cohorts.progress import StageSnapshot, cohort_progress
from services.gateway.cohorts.stage_order import StageState
from services.gateway.notices import NoticeKey
from shared.topics import Stage

TERMINAL = frozenset({"completed", "failed", "cancelled"})
ACTIVE = frozenset({"pending", "running"})

COHORT_FIELDS = (
    "name",
    "source_path",
    "description",
    "owner",
    "tags",
    "anonymization_enabled",
    "study_quiet_period_s",
)


# --- cohorts ---------------------------------------------------------------------------------


async def insert_cohort(conn: asyncpg.Connection, values: dict[str, Any]) -> asyncpg.Record:
    """Insert a cohort; raises `asyncpg.UniqueViolationError` when the name is taken."""
    row = await conn.fetchrow(
        "INSERT INTO gateway.cohorts (id, name, source_path, description, owner, tags,"
        " anonymization_enabled, study_quiet_period_s) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " RETURNING *",
        uuid.uuid4(),
        *(values[f] for f in COHORT_FIELDS),
    )
    assert row is not None
    return row


async def get_cohort(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM gateway.cohorts WHERE id = $1", cohort_id)


async def lock_cohort(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM gateway.cohorts WHERE id = $1 FOR UPDATE", cohort_id)


async def find_cohort(conn: asyncpg.Connection, ref: str) -> asyncpg.Record | None:
    """A cohort by id (when `ref` is a UUID) or by name (any case)."""
    try:
        return await get_cohort(conn, uuid.UUID(ref))
    except ValueError:
        return await conn.fetchrow(
            "SELECT * FROM gateway.cohorts WHERE lower(name) = lower($1)", ref.strip()
        )


async def cohorts_containing(conn: asyncpg.Connection, location: str) -> list[asyncpg.Record]:
    """Cohorts whose source_path is `location` or one of its parent folders (or S3 prefixes)."""
    return await conn.fetch(
        "SELECT * FROM gateway.cohorts WHERE source_path = $1"
        " OR left($1, length(rtrim(source_path, '/')) + 1) = rtrim(source_path, '/') || '/'"
        " ORDER BY created_at",
        location,
    )


async def list_cohorts(conn: asyncpg.Connection, status: str | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM gateway.cohorts WHERE $1::text IS NULL OR status = $1 ORDER BY created_at",
        status,
    )


async def update_cohort(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, values: dict[str, Any]
) -> asyncpg.Record:
    """Set the given cohort fields; raises `asyncpg.UniqueViolationError` on a taken name."""
    fields = [f for f in COHORT_FIELDS if f in values]
    assignments = ", ".join(f"{f} = ${i}" for i, f in enumerate(fields, start=2))
    row = await conn.fetchrow(
        f"UPDATE gateway.cohorts SET {assignments}{', ' if fields else ''}updated_at = now()"
        " WHERE id = $1 RETURNING *",
        cohort_id,
        *(values[f] for f in fields),
    )
    assert row is not None
    return row


async def delete_cohort(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM gateway.cohorts WHERE id = $1", cohort_id)


async def set_cohort_totals(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, summary: dict[str, Any], *, exact: bool
) -> None:
    """Cohort metrics from an extraction summary: exact on completion, never lower on progress."""

    def count(*keys: str) -> int | None:
        for key in keys:
            value = summary.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return int(value)
        return None

    values = {
        "total_subjects": count("subjects"),
        "total_sessions": count("sessions", "studies"),
        "total_series": count("series"),
        "total_instances": count("instances"),
    }
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return
    if exact:
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(given, start=2))
    else:
        sets = ", ".join(f"{k} = GREATEST({k}, ${i})" for i, k in enumerate(given, start=2))
    await conn.execute(
        f"UPDATE gateway.cohorts SET {sets}, updated_at = now() WHERE id = $1",
        cohort_id,
        *given.values(),
    )


# --- stage states and cohort status -------------------------------------------------------------


async def latest_stage_jobs(
    conn: asyncpg.Connection, cohort_id: uuid.UUID
) -> dict[Stage, asyncpg.Record]:
    """Each stage's latest whole-cohort job (scoped study runs do not set a stage's state)."""
    return (await latest_stage_jobs_of(conn, [cohort_id])).get(cohort_id, {})


async def latest_stage_jobs_of(
    conn: asyncpg.Connection, cohort_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[Stage, asyncpg.Record]]:
    """`latest_stage_jobs` of several cohorts in one query."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (cohort_id, stage) * FROM gateway.jobs"
        " WHERE cohort_id = ANY($1::uuid[]) AND NOT scoped"
        " ORDER BY cohort_id, stage, created_at DESC, position DESC",
        list(cohort_ids),
    )
    found: dict[uuid.UUID, dict[Stage, asyncpg.Record]] = {}
    for row in rows:
        found.setdefault(row["cohort_id"], {})[Stage(row["stage"])] = row
    return found


async def stages_ever_run(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> set[Stage]:
    """The stages the cohort has had a job of (whole-cohort or scoped, whatever its status)."""
    rows = await conn.fetch(
        "SELECT DISTINCT stage FROM gateway.jobs WHERE cohort_id = $1", cohort_id
    )
    return {Stage(r["stage"]) for r in rows}


def stage_states(jobs: dict[Stage, asyncpg.Record]) -> dict[Stage, StageState]:
    return {stage: StageState(job["status"]) for stage, job in jobs.items()}


async def refresh_cohort_status(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> None:
    """Recompute the cohort's status and completion percentage from its jobs."""
    cohort = await get_cohort(conn, cohort_id)
    if cohort is None:
        return
    jobs = await latest_stage_jobs(conn, cohort_id)
    snapshots = {
        stage: StageSnapshot(StageState(job["status"]), float(job["progress"]))
        for stage, job in jobs.items()
    }
    scoped = await conn.fetch(
        "SELECT status FROM gateway.jobs WHERE cohort_id = $1 AND scoped"
        " AND status IN ('pending', 'running')",
        cohort_id,
    )
    result = cohort_progress(
        cohort["anonymization_enabled"], snapshots, [StageState(r["status"]) for r in scoped]
    )
    await conn.execute(
        "UPDATE gateway.cohorts SET status = $2, completion_percentage = $3, updated_at = now()"
        " WHERE id = $1 AND (status <> $2 OR completion_percentage <> $3)",
        cohort_id,
        result.status.value,
        result.completion_percentage,
    )


# --- runs and jobs ---------------------------------------------------------------------------


async def insert_run(
    conn: asyncpg.Connection,
    cohort_id: uuid.UUID,
    kind: str,
    study_instance_uids: Sequence[str] = (),
    location: str | None = None,
) -> uuid.UUID:
    run_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO gateway.pipeline_runs (id, cohort_id, kind, study_instance_uids, location)"
        " VALUES ($1, $2, $3, $4, $5)",
        run_id,
        cohort_id,
        kind,
        list(study_instance_uids),
        location,
    )
    return run_id


async def insert_job(
    conn: asyncpg.Connection,
    *,
    job_id: uuid.UUID,
    cohort_id: uuid.UUID,
    run_id: uuid.UUID,
    position: int,
    stage: Stage,
    scoped: bool,
    config: dict[str, Any],
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO gateway.jobs (id, cohort_id, run_id, position, stage, scoped, config)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        job_id,
        cohort_id,
        run_id,
        position,
        stage.value,
        scoped,
        config,
    )
    assert row is not None
    await record_transition(conn, row, None, "pending", "requested")
    return row


async def get_job(
    conn: asyncpg.Connection, job_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(f"SELECT * FROM gateway.jobs WHERE id = $1{lock}", job_id)


async def job_brief(conn: asyncpg.Connection, job_id: uuid.UUID) -> asyncpg.Record | None:
    """A job's cohort, stage and status only (asked once per file an export serves: not the
    summary, which can be large)."""
    return await conn.fetchrow(
        "SELECT cohort_id, stage, status FROM gateway.jobs WHERE id = $1", job_id
    )


async def list_jobs(
    conn: asyncpg.Connection,
    *,
    cohort_id: uuid.UUID | None,
    status: str | None,
    stage: str | None,
    limit: int,
    offset: int,
    run_id: uuid.UUID | None = None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM gateway.jobs WHERE ($1::uuid IS NULL OR cohort_id = $1)"
        " AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR stage = $3)"
        " AND ($6::uuid IS NULL OR run_id = $6)"
        " ORDER BY created_at DESC, position LIMIT $4 OFFSET $5",
        cohort_id,
        status,
        stage,
        limit,
        offset,
        run_id,
    )


async def later_jobs_of_run(conn: asyncpg.Connection, job: asyncpg.Record) -> list[asyncpg.Record]:
    """The jobs after `job` in its run that have not ended (the rest of its routing slip)."""
    return await conn.fetch(
        "SELECT * FROM gateway.jobs WHERE run_id = $1 AND position > $2"
        " AND status IN ('pending', 'running') ORDER BY position FOR UPDATE",
        job["run_id"],
        job["position"],
    )


async def job_events(conn: asyncpg.Connection, job_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM gateway.job_events WHERE job_id = $1 ORDER BY seq", job_id
    )


async def record_transition(
    conn: asyncpg.Connection,
    job: asyncpg.Record,
    from_status: str | None,
    to_status: str,
    reason: str | None,
    event_id: uuid.UUID | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO gateway.job_events (job_id, cohort_id, from_status, to_status, reason,"
        " event_id) VALUES ($1, $2, $3, $4, $5, $6)",
        job["id"],
        job["cohort_id"],
        from_status,
        to_status,
        reason,
        event_id,
    )


async def set_job_state(
    conn: asyncpg.Connection,
    job: asyncpg.Record,
    *,
    status: str | None = None,
    reason: str | None = None,
    event_id: uuid.UUID | None = None,
    **values: Any,
) -> asyncpg.Record:
    """Update a job's columns; a status change also stamps its times and logs the transition."""
    changes = dict(values)
    if status is not None and status != job["status"]:
        changes["status"] = status
        changes["status_reason"] = reason
        if status == "running" or (status in TERMINAL and job["started_at"] is None):
            changes.setdefault("started_at", _NOW)
        if status in TERMINAL:
            changes["finished_at"] = _NOW
    if not changes:
        return job
    columns = list(changes)
    params: list[Any] = []
    sets = []
    for column in columns:
        if changes[column] is _NOW:
            sets.append(f"{column} = now()")
        else:
            params.append(changes[column])
            sets.append(f"{column} = ${len(params) + 1}")
    row = await conn.fetchrow(
        f"UPDATE gateway.jobs SET {', '.join(sets)}, updated_at = now() WHERE id = $1 RETURNING *",
        job["id"],
        *params,
    )
    assert row is not None
    if "status" in changes:
        await record_transition(conn, job, job["status"], changes["status"], reason, event_id)
        await outbound.job_changed(conn, row)
    return row


class _Now:
    """Marker: let Postgres stamp the column with its transaction time."""


_NOW = _Now()


# --- stalls -----------------------------------------------------------------------------------

STALLED = "stalled: "  # the status_reason prefix of a job nobody works on

# an active job whose stage should be at work on it (nothing before it in its run is still open)
# and from which nothing was heard for $1 seconds: since its last report, its start, or the end of
# the job before it, whichever came last
_STALLED_SQL = """
    j.status IN ('pending', 'running')
    AND (j.status_reason IS NULL OR j.status_reason NOT LIKE 'stalled: %')
    AND NOT EXISTS (SELECT 1 FROM gateway.jobs p WHERE p.run_id = j.run_id
                    AND p.position < j.position AND p.status IN ('pending', 'running'))
    AND GREATEST(j.heard_at, j.started_at, j.created_at,
                 (SELECT max(p.finished_at) FROM gateway.jobs p
                  WHERE p.run_id = j.run_id AND p.position < j.position))
        < now() - make_interval(secs => $1)
"""


async def stall_candidates(conn: asyncpg.Connection, after_s: float) -> list[asyncpg.Record]:
    """Active jobs nothing was heard from for `after_s` seconds and not yet marked stalled."""
    return await conn.fetch(
        f"SELECT j.id, j.cohort_id, j.stage FROM gateway.jobs j WHERE {_STALLED_SQL}", after_s
    )


async def mark_stalled(
    conn: asyncpg.Connection, job_id: uuid.UUID, after_s: float, reason: str
) -> bool:
    """Put `reason` in the job's status_reason if it still qualifies (the caller holds the
    cohort's lock); True when it did."""
    marked = await conn.fetchval(
        f"UPDATE gateway.jobs j SET status_reason = $3, updated_at = now()"
        f" WHERE j.id = $2 AND {_STALLED_SQL} RETURNING true",
        after_s,
        job_id,
        reason,
    )
    return bool(marked)


async def heard_from(conn: asyncpg.Connection, job_id: uuid.UUID) -> None:
    """A stage service reported on the job: stamp it, and lift a stall mark."""
    await conn.execute(
        "UPDATE gateway.jobs SET heard_at = now(), status_reason = CASE WHEN status_reason"
        " LIKE 'stalled: %' THEN NULL ELSE status_reason END"
        " WHERE id = $1 AND status IN ('pending', 'running')",
        job_id,
    )


# --- inbox, received studies --------------------------------------------------------------------


async def claim_event(conn: asyncpg.Connection, event_id: uuid.UUID, event_type: str) -> bool:
    """True the first time an event is seen; False for a redelivery (already applied)."""
    inserted = await conn.fetchval(
        "INSERT INTO gateway.inbox (event_id, type) VALUES ($1, $2)"
        " ON CONFLICT (event_id) DO NOTHING RETURNING true",
        event_id,
        event_type,
    )
    return bool(inserted)


def _storable(text: str | None) -> str | None:
    # a refused notice may carry what Postgres text cannot hold: keep it, escaped
    return None if text is None else text.replace("\x00", "\\x00")


async def record_received_study(
    conn: asyncpg.Connection,
    *,
    event_id: uuid.UUID | None,
    cohort_id: uuid.UUID | None,
    study_instance_uid: str,
    location: str,
    origin: str,
    run_id: uuid.UUID | None,
    outcome: str,
    refused_reason: str | None = None,
    key: NoticeKey | None = None,
    sender: dict[str, Any] | None = None,
    expected_instances: int | None = None,
    complete: bool | None = None,
    files: int | None = None,
    content_fingerprint: str | None = None,
    duplicate_of: int | None = None,
) -> int:
    """One received notice, whatever came of it; returns its `seq`. A waiting notice's quiet period
    counts from now."""
    seq: int = await conn.fetchval(
        "INSERT INTO gateway.received_studies (event_id, cohort_id, study_instance_uid, location,"
        " origin, run_id, refused_reason, outcome, notice_source, notice_id, notice_type, sender,"
        " expected_instances, complete, files, content_fingerprint, duplicate_of, last_change_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,"
        " CASE WHEN $8 = 'waiting' THEN now() END) RETURNING seq",
        event_id,
        cohort_id,
        _storable(study_instance_uid),
        _storable(location),
        origin,
        run_id,
        _storable(refused_reason),
        outcome,
        _storable(key.source) if key else None,
        _storable(key.id) if key else None,
        _storable(key.type) if key else None,
        sender,
        expected_instances,
        complete,
        files,
        content_fingerprint,
        duplicate_of,
    )
    return seq


async def notice_seen(
    conn: asyncpg.Connection, source: str, notice_id: str
) -> asyncpg.Record | None:
    """The first notice with this CloudEvent (`source`, `id`), after taking a lock on that pair so
    two copies arriving at once are told apart."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        json.dumps(["notice", source, notice_id]),
    )
    return await conn.fetchrow(
        "SELECT * FROM gateway.received_studies WHERE notice_source = $1 AND notice_id = $2"
        " AND outcome <> 'duplicate' ORDER BY seq LIMIT 1",
        _storable(source),
        _storable(notice_id),
    )


async def same_content_notice(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, study_instance_uid: str, fingerprint: str
) -> asyncpg.Record | None:
    """The latest accepted notice that ran this study of the cohort on the same files, unless its
    run failed or was cancelled (then a resend is the way to try again). Call under the cohort
    lock."""
    return await conn.fetchrow(
        "SELECT r.* FROM gateway.received_studies r WHERE r.cohort_id = $1"
        " AND r.study_instance_uid = $2 AND r.content_fingerprint = $3 AND r.outcome = 'accepted'"
        " AND r.run_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM gateway.jobs j"
        " WHERE j.run_id = r.run_id AND j.status IN ('failed', 'cancelled'))"
        " ORDER BY r.seq DESC LIMIT 1",
        cohort_id,
        study_instance_uid,
        fingerprint,
    )


async def active_scoped_jobs(
    conn: asyncpg.Connection, cohort_id: uuid.UUID
) -> list[asyncpg.Record]:
    """The cohort's pending or running jobs of new-study runs, with their runs' study UIDs."""
    return await conn.fetch(
        "SELECT j.*, r.study_instance_uids FROM gateway.jobs j JOIN gateway.pipeline_runs r"
        " ON r.id = j.run_id"
        " WHERE j.cohort_id = $1 AND j.scoped AND j.status IN ('pending', 'running')",
        cohort_id,
    )


async def waiting_notice(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, study_instance_uid: str
) -> asyncpg.Record | None:
    """The notice of this study of the cohort that waits for its quiet period, if any."""
    return await conn.fetchrow(
        "SELECT * FROM gateway.received_studies WHERE cohort_id = $1 AND study_instance_uid = $2"
        " AND outcome = 'waiting' ORDER BY seq LIMIT 1 FOR UPDATE",
        cohort_id,
        study_instance_uid,
    )


async def waiting_notices(conn: asyncpg.Connection, limit: int = 100) -> list[asyncpg.Record]:
    """Notices waiting for their quiet period, oldest change first, with the cohort's period."""
    return await conn.fetch(
        "SELECT r.*, c.study_quiet_period_s FROM gateway.received_studies r"
        " JOIN gateway.cohorts c ON c.id = r.cohort_id WHERE r.outcome = 'waiting'"
        " ORDER BY r.last_change_at LIMIT $1",
        limit,
    )


async def settle_notice(conn: asyncpg.Connection, seq: int, **values: Any) -> None:
    """Update a waiting notice (its content seen changing, or its outcome decided)."""
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
    await conn.execute(
        f"UPDATE gateway.received_studies SET {sets} WHERE seq = $1", seq, *values.values()
    )


async def jobs_of_run(conn: asyncpg.Connection, run_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM gateway.jobs WHERE run_id = $1 ORDER BY position", run_id
    )


async def received_studies(
    conn: asyncpg.Connection,
    *,
    cohort_id: uuid.UUID | None,
    refused: bool | None,
    outcome: str | None = None,
    limit: int,
    offset: int,
) -> list[asyncpg.Record]:
    """Received "new study" notices, newest first."""
    return await conn.fetch(
        "SELECT * FROM gateway.received_studies WHERE ($1::uuid IS NULL OR cohort_id = $1)"
        " AND ($2::bool IS NULL OR (refused_reason IS NOT NULL) = $2)"
        " AND ($3::text IS NULL OR outcome = $3)"
        " ORDER BY seq DESC LIMIT $4 OFFSET $5",
        cohort_id,
        refused,
        outcome,
        limit,
        offset,
    )


# --- routing rules --------------------------------------------------------------------------------


async def routing_rules(
    conn: asyncpg.Connection, cohort_id: uuid.UUID | None = None
) -> list[asyncpg.Record]:
    """Routing rules with their cohort's name: of one cohort, or of all."""
    return await conn.fetch(
        "SELECT r.*, c.name AS cohort_name FROM gateway.routing_rules r"
        " JOIN gateway.cohorts c ON c.id = r.cohort_id"
        " WHERE $1::uuid IS NULL OR r.cohort_id = $1 ORDER BY r.priority, r.created_at",
        cohort_id,
    )


async def insert_routing_rule(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, rule: dict[str, Any], priority: int
) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO gateway.routing_rules (id, cohort_id, rule, priority) VALUES ($1, $2, $3, $4)"
        " RETURNING *",
        uuid.uuid4(),
        cohort_id,
        rule,
        priority,
    )
    assert row is not None
    return row


async def delete_routing_rule(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, rule_id: uuid.UUID
) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM gateway.routing_rules WHERE id = $1 AND cohort_id = $2 RETURNING true",
        rule_id,
        cohort_id,
    )
    return bool(deleted)


async def retract_study(
    conn: asyncpg.Connection,
    cohort_id: uuid.UUID,
    study_instance_uid: str,
    reason: str,
    notice: int,
) -> None:
    """The study leaves the cohort's next export (the newest retraction's reason is kept)."""
    await conn.execute(
        "INSERT INTO gateway.retracted_studies (cohort_id, study_instance_uid, reason, notice)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (cohort_id, study_instance_uid) DO UPDATE"
        " SET reason = EXCLUDED.reason, notice = EXCLUDED.notice, retracted_at = now()",
        cohort_id,
        _storable(study_instance_uid),
        reason,
        notice,
    )


async def unretract_study(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, study_instance_uid: str
) -> bool:
    """Take a retraction back (the study was announced available again); True if there was one."""
    status = await conn.execute(
        "DELETE FROM gateway.retracted_studies WHERE cohort_id = $1 AND study_instance_uid = $2",
        cohort_id,
        _storable(study_instance_uid),
    )
    return bool(status != "DELETE 0")


async def was_retracted(
    conn: asyncpg.Connection, cohort_id: uuid.UUID, study_instance_uid: str
) -> bool:
    """Whether a retraction of the study was ever recorded for the cohort (the notice log)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM gateway.received_studies WHERE cohort_id = $1"
            " AND study_instance_uid = $2 AND outcome = 'retracted')",
            cohort_id,
            _storable(study_instance_uid),
        )
    )


async def keeps_original_uids(conn: asyncpg.Connection, cohort_id: uuid.UUID) -> bool:
    """Whether the cohort's latest completed anonymization kept the original UIDs (`retain_uids`):
    then its catalog holds the original StudyInstanceUIDs (ADR 0025, "Retain UIDs")."""
    kept = await conn.fetchval(
        "SELECT (config ->> 'retain_uids')::boolean FROM gateway.jobs WHERE cohort_id = $1"
        " AND stage = 'anonymization' AND status = 'completed'"
        " ORDER BY finished_at DESC NULLS LAST, created_at DESC LIMIT 1",
        cohort_id,
    )
    return bool(kept)


async def get_run(conn: asyncpg.Connection, run_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM gateway.pipeline_runs WHERE id = $1", run_id)


# --- dead letters (docs/adr-0022-dead-letters.md) ----------------------------------------------


def _storable_json(value: dict[str, Any]) -> Any:
    """`value` as jsonb can hold it: a NUL (which jsonb refuses) kept as the text `\\x00`."""
    text = json.dumps(value)
    return json.loads(text.replace("\\u0000", "\\\\x00")) if "\\u0000" in text else value


async def insert_dead_letter(
    conn: asyncpg.Connection,
    *,
    id: uuid.UUID,
    stage: str,
    kind: str,
    topic: str,
    cohort_id: uuid.UUID | None,
    job_id: uuid.UUID | None,
    correlation_id: uuid.UUID | None,
    item_key: str | None,
    error: str,
    attempts: int,
    original: dict[str, Any],
    source: str,
    dead_at: datetime,
) -> bool:
    """Keep a dead letter once (False when its id was kept before)."""
    kept = await conn.fetchval(
        "INSERT INTO gateway.dead_letters (id, stage, kind, topic, cohort_id, job_id,"
        " correlation_id, item_key, error, attempts, original, source, dead_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        " ON CONFLICT (id) DO NOTHING RETURNING true",
        id,
        stage,
        kind,
        _storable(topic),
        cohort_id,
        job_id,
        correlation_id,
        _storable(item_key),
        _storable(error),
        attempts,
        _storable_json(original),
        _storable(source),
        dead_at,
    )
    return bool(kept)


async def list_dead_letters(
    conn: asyncpg.Connection,
    *,
    stage: str | None,
    cohort_id: uuid.UUID | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[asyncpg.Record]:
    """Newest first."""
    return list(
        await conn.fetch(
            "SELECT * FROM gateway.dead_letters WHERE ($1::text IS NULL OR stage = $1)"
            " AND ($2::uuid IS NULL OR cohort_id = $2) AND ($3::text IS NULL OR status = $3)"
            " ORDER BY received_at DESC, id LIMIT $4 OFFSET $5",
            stage,
            cohort_id,
            status,
            limit,
            offset,
        )
    )


async def get_dead_letter(
    conn: asyncpg.Connection, letter_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM gateway.dead_letters WHERE id = $1" + (" FOR UPDATE" if for_update else ""),
        letter_id,
    )


async def resolve_dead_letter(
    conn: asyncpg.Connection,
    letter_id: uuid.UUID,
    status: str,
    *,
    replay_run_id: uuid.UUID | None = None,
    note: str | None = None,
) -> asyncpg.Record:
    """The letter replayed (by `replay_run_id`) or discarded (with `note`)."""
    row: asyncpg.Record = await conn.fetchrow(
        "UPDATE gateway.dead_letters SET status = $2, replay_run_id = $3, note = $4,"
        " resolved_at = now() WHERE id = $1 RETURNING *",
        letter_id,
        status,
        replay_run_id,
        _storable(note),
    )
    return row
