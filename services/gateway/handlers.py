"""One function per consumed message: progress, completion and failure of stage runs, and "new
study" notices (from Kafka or from `POST /api/studies`, through the same `receive_study`).

Each applies its event in one transaction, under the cohort lock. Completion, failure and study
events are recorded in the inbox so a redelivery changes nothing; progress is naturally idempotent
(counters only grow, a status only moves forward).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import pydicom
from prometheus_client import Counter
from pydantic import ValidationError

from services.gateway import SCHEMA, outbound
from services.gateway import repository as repo
from services.gateway.cohorts.progress import job_progress, merge_job_errors
from services.gateway.errors import Invalid, NotFound
from services.gateway.notices import Notice, NoticeKey, content_fingerprint
from services.gateway.routing import Ambiguous, CohortRule, RouteRule, StudyFacts, choose
from services.gateway.runs import RunStarted, start_study_run
from shared import topics
from shared.events import (
    Envelope,
    JobHeartbeat,
    JobProgress,
    StageCompleted,
    StageFailed,
    StudyNoticeEvent,
    StudyReceived,
    StudyRetraction,
    work_left_behind,
)
from shared.loops import BackgroundLoop
from shared.observability import REGISTRY
from shared.outbox import enqueue
from shared.secrets import seal
from shared.settings import Settings
from shared.sources import SourceError, check_location, open_source
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
            # a streamed pipeline run's later job runs from the start, planning studies as they
            # pass the stage before it (ADR 0023)
            reason="open: takes studies as they pass the stage before it"
            if progress.upstream_open
            else "first progress from the stage workers",
            event_id=envelope.id,
            # an open job that has caught up with the studies passed so far is not done
            progress=min(
                job_progress(counts["items_total"], counts["items_done"], counts["items_failed"]),
                99.0 if progress.upstream_open else 100.0,
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
    outcome: Literal["accepted", "duplicate", "waiting", "retracted"] = "accepted"
    seq: int | None = None  # the notice's row in gateway.received_studies
    duplicate_of: int | None = None  # the earlier notice's row, for a duplicate


@dataclass(frozen=True)
class _Content:
    """What the study's location held when the notice came (None when it could not be listed)."""

    fingerprint: str | None
    files: int | None


async def _content_of(location: str, settings: Settings) -> _Content:
    """Fingerprint of the files a stage would read at `location` (listed off the event loop)."""

    def listing() -> tuple[str, int]:
        return content_fingerprint(open_source(location, settings).list())

    try:
        fingerprint, files = await asyncio.to_thread(listing)
    except Exception as exc:  # a location that cannot be listed: no content dedup, the stage says
        log.warning("study location not listed", extra={"error": str(exc)[:300]})
        return _Content(None, None)
    return _Content(fingerprint, files)


async def receive_study(
    pool: asyncpg.Pool,
    settings: Settings,
    study: StudyReceived,
    origin: Literal["http", "kafka"],
    event_id: uuid.UUID | None = None,
    key: NoticeKey | None = None,
) -> StudyAccepted:
    """Add a study to its cohort and run the pipeline for that study only, once.

    The cohort is `study.cohort` (a name or an id), or else the one cohort whose source_path
    contains the study's location. Raises `Invalid` (no cohort found that way, bad location) or
    `NotFound` (no such cohort); a refusal is recorded in `gateway.received_studies` too. A notice
    already seen (the same CloudEvent `key`, or the same files of the same study of the cohort,
    unless that run failed or was cancelled) starts nothing: it is recorded as a duplicate of the
    earlier one and returned with that one's run.
    """
    try:
        content = await _content_of(check_location(study.location, settings), settings)
    except (SourceError, ValueError, OSError):  # refused below, with the reason, in the record
        content = _Content(None, None)
    facts = await _facts_of(pool, settings, study, key)
    notice: dict[str, Any] = {
        "event_id": event_id,
        "study_instance_uid": study.study_instance_uid,
        "origin": origin,
        "key": key,
        "sender": study.origin.model_dump(mode="json", exclude_none=True) if study.origin else None,
        "expected_instances": study.expected_instances,
        "complete": study.complete,
        "files": content.files,
        "content_fingerprint": content.fingerprint,
    }
    async with pool.acquire() as conn, conn.transaction():
        if event_id is not None and not await repo.claim_event(conn, event_id, "StudyReceived"):
            raise _Duplicate()
        if key is not None:
            earlier = await repo.notice_seen(conn, key.source, key.id)
            if earlier is not None:
                return await _duplicate(conn, study, earlier, notice)
        try:
            cohort, location = await _study_target(conn, settings, study, facts)
        except (Invalid, NotFound) as exc:
            refused: Invalid | NotFound = exc
        else:
            uid = study.study_instance_uid
            # the study is available again: a retraction of it no longer holds
            await _retraction_changed(conn, settings, cohort, uid, retracted=False, reason="")
            waiting = None
            if study.run_pipeline:
                if content.fingerprint is not None:
                    earlier = await repo.same_content_notice(
                        conn, cohort["id"], uid, content.fingerprint
                    )
                    if earlier is not None:
                        return await _duplicate(conn, study, earlier, notice)
                waiting = await repo.waiting_notice(conn, cohort["id"], uid)
                if not _complete(study.complete, study.expected_instances, content.files) and (
                    cohort["study_quiet_period_s"] > 0
                ):
                    if waiting is not None:  # its run will read whatever has arrived by then
                        return await _duplicate(conn, study, waiting, notice)
                    seq = await repo.record_received_study(
                        conn,
                        **notice,
                        cohort_id=cohort["id"],
                        location=location,
                        run_id=None,
                        outcome="waiting",
                    )
                    return StudyAccepted(
                        cohort["id"], uid, location, None, outcome="waiting", seq=seq
                    )
            run = None
            if study.run_pipeline:
                run = await start_study_run(conn, cohort, uid, location)
            seq = await repo.record_received_study(
                conn,
                **notice,
                cohort_id=cohort["id"],
                location=location,
                run_id=run.run_id if run else None,
                outcome="accepted",
            )
            if waiting is not None:  # the sender said it is complete: the wait is over
                await repo.settle_notice(
                    conn, waiting["seq"], outcome="duplicate", duplicate_of=seq
                )
            await _announce(conn, "study.accepted", seq, uid, cohort["id"], location, run, None)
            return StudyAccepted(cohort["id"], uid, location, run, seq=seq)
        # the refusal is committed (and the event claimed): a retry could not make it acceptable
        seq = await repo.record_received_study(
            conn,
            **notice,
            cohort_id=None,
            location=study.location,
            run_id=None,
            outcome="refused",
            refused_reason=str(refused),
        )
        await _announce(
            conn,
            "study.refused",
            seq,
            study.study_instance_uid,
            None,
            study.location,
            None,
            refused,
        )
    raise refused


async def _announce(
    conn: asyncpg.Connection,
    name: str,
    seq: int,
    study_instance_uid: str,
    cohort_id: uuid.UUID | None,
    location: str,
    run: RunStarted | None,
    refused: Exception | None,
) -> None:
    """`study.accepted` / `study.refused` for other systems (never the patient id or accession)."""
    data = StudyNoticeEvent(
        notice=seq,
        study_instance_uid=study_instance_uid,
        cohort_id=cohort_id,
        location=location.replace("\x00", "\\x00"),
        run_id=run.run_id if run else None,
        reason=str(refused) if refused else None,
    )
    await outbound.emit(conn, data, name=name, subject=study_instance_uid)


def _complete(asserted: bool | None, expected: int | None, files: int | None) -> bool:
    """Whether a study may start without waiting: its sender says it is complete, or as many files
    as it said to expect are there."""
    return bool(asserted) or (expected is not None and files is not None and files >= expected)


class StudyWatcher(BackgroundLoop):
    """Starts the runs of notices that wait for their quiet period: each pass lists every waiting
    study's location; a changed fingerprint restarts its quiet period, an unchanged one older than
    the cohort's `study_quiet_period_s` (or as many files as expected) starts its run. Replicas
    may all run one: the notice row is locked and re-checked before anything starts."""

    name = "study-watcher"

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        super().__init__(settings.study_watch_interval_s)
        self._pool = pool
        self._settings = settings

    async def step(self) -> bool:
        await self.check()
        return False  # the next pass after the interval: files need time to change

    async def check(self) -> int:
        """One pass; returns how many runs it started."""
        async with self._pool.acquire() as conn:
            waiting = await repo.waiting_notices(conn)
        started = 0
        for row in waiting:
            content = await _content_of(row["location"], self._settings)
            async with self._pool.acquire() as conn, conn.transaction():
                cohort = await repo.lock_cohort(conn, row["cohort_id"])
                current = await conn.fetchrow(
                    "SELECT *, now() - last_change_at AS quiet_for FROM gateway.received_studies"
                    " WHERE seq = $1 AND outcome = 'waiting' FOR UPDATE",
                    row["seq"],
                )
                if cohort is None or current is None:
                    continue
                if content.fingerprint != current["content_fingerprint"]:
                    await repo.settle_notice(
                        conn,
                        current["seq"],
                        content_fingerprint=content.fingerprint,
                        files=content.files,
                        last_change_at=datetime.now(UTC),
                    )
                    continue
                quiet = current["quiet_for"].total_seconds() >= cohort["study_quiet_period_s"]
                if not quiet and not _complete(None, current["expected_instances"], content.files):
                    continue
                started += await self._start(conn, cohort, current, content)
        return started

    @staticmethod
    async def _start(
        conn: asyncpg.Connection, cohort: asyncpg.Record, notice: asyncpg.Record, content: _Content
    ) -> int:
        uid = notice["study_instance_uid"]
        if content.fingerprint is not None:
            earlier = await repo.same_content_notice(conn, cohort["id"], uid, content.fingerprint)
            if earlier is not None:
                await repo.settle_notice(
                    conn, notice["seq"], outcome="duplicate", duplicate_of=earlier["seq"]
                )
                return 0
        run = await start_study_run(conn, cohort, uid, notice["location"])
        await repo.settle_notice(conn, notice["seq"], outcome="accepted", run_id=run.run_id)
        await _announce(
            conn, "study.accepted", notice["seq"], uid, cohort["id"], notice["location"], run, None
        )
        log.info("study quiet: run started", extra={"cohort_id": str(cohort["id"])})
        return 1


async def _duplicate(
    conn: asyncpg.Connection,
    study: StudyReceived,
    earlier: asyncpg.Record,
    notice: dict[str, Any],
) -> StudyAccepted:
    """Record a notice seen before; the earlier one's outcome stands (a refusal is raised again)."""
    seq = await repo.record_received_study(
        conn,
        **notice,
        cohort_id=earlier["cohort_id"],
        location=earlier["location"],
        run_id=earlier["run_id"],
        outcome="duplicate",
        duplicate_of=earlier["seq"],
    )
    if earlier["outcome"] == "refused":
        raise Invalid(f"this notice was refused before: {earlier['refused_reason']}")
    run = None
    if earlier["run_id"] is not None:
        run = RunStarted(earlier["run_id"], await repo.jobs_of_run(conn, earlier["run_id"]))
    return StudyAccepted(
        earlier["cohort_id"],
        study.study_instance_uid,
        earlier["location"],
        run,
        outcome="duplicate",
        seq=seq,
        duplicate_of=earlier["seq"],
    )


class _Duplicate(Exception):
    """A redelivered study event, already handled."""


async def _study_target(
    conn: asyncpg.Connection, settings: Settings, study: StudyReceived, facts: StudyFacts
) -> tuple[asyncpg.Record, str]:
    """The cohort (locked) and checked location of a notice: the cohort it names, else the one
    its routing rules choose, else the one whose source folder holds the location."""
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
        rules = [_cohort_rule(r) for r in await repo.routing_rules(conn)]
        try:
            chosen = choose(rules, facts)
        except Ambiguous as exc:
            raise Invalid(str(exc)) from None
        if chosen is not None:
            found = await repo.get_cohort(conn, chosen)
            assert found is not None
        else:
            # the ingest rule: a study dropped inside a cohort's source folder belongs to it
            containing = await repo.cohorts_containing(conn, location)
            if len(containing) != 1:
                raise Invalid(
                    f"no cohort given, none of the {len(rules)} routing rules holds, and "
                    + ("none" if not containing else f"{len(containing)} cohorts")
                    + " have a source_path containing the location: name the cohort (name or"
                    " id) or add a routing rule"
                )
            found = containing[0]
    cohort = await repo.lock_cohort(conn, found["id"])
    assert cohort is not None
    return cohort, location


def _cohort_rule(row: asyncpg.Record) -> CohortRule:
    return CohortRule(row["cohort_id"], row["cohort_name"], RouteRule.model_validate(row["rule"]))


async def _facts_of(
    pool: asyncpg.Pool, settings: Settings, study: StudyReceived, key: NoticeKey | None
) -> StudyFacts:
    """What routing may test about the study: the notice's own words, completed from one DICOM
    header at the location when a rule needs what the notice does not say."""
    origin = study.origin
    facts = StudyFacts(
        source=key.source if key else (origin.system if origin else None),
        calling_ae=origin.calling_ae if origin else None,
        called_ae=origin.called_ae if origin else None,
        modalities=frozenset(study.modalities),
        study_description=study.study_description,
        institution=study.institution,
    )
    if study.cohort:
        return facts
    async with pool.acquire() as conn:
        rules = [_cohort_rule(r) for r in await repo.routing_rules(conn)]
    known = facts.modalities and facts.study_description and facts.institution
    if known or not any(r.rule.needs_header() for r in rules):
        return facts
    try:
        found = await asyncio.to_thread(
            _header_facts, check_location(study.location, settings), settings
        )
    except (SourceError, ValueError, OSError):
        return facts  # refused later with the reason
    return StudyFacts(
        source=facts.source,
        calling_ae=facts.calling_ae,
        called_ae=facts.called_ae,
        modalities=facts.modalities or found.modalities,
        study_description=facts.study_description or found.study_description,
        institution=facts.institution or found.institution,
    )


_ROUTING_TAGS = ["Modality", "StudyDescription", "InstitutionName"]


def _header_facts(location: str, settings: Settings, tries: int = 20) -> StudyFacts:
    """Modality, StudyDescription and InstitutionName from the first readable DICOM header among
    the first `tries` files of the location (a study's files agree on these)."""
    source = open_source(location, settings)
    for count, entry in enumerate(f for f in source.list() if f.rejected is None):
        if count >= tries:
            break
        try:
            with source.open(entry.key) as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=_ROUTING_TAGS)
        except Exception:  # not DICOM, unreadable: try the next file
            continue
        modality = str(ds.get("Modality", "") or "")
        if not modality:
            continue
        return StudyFacts(
            modalities=frozenset({modality}),
            study_description=str(ds.get("StudyDescription", "") or "") or None,
            institution=str(ds.get("InstitutionName", "") or "") or None,
        )
    return StudyFacts()


async def receive_notice(
    pool: asyncpg.Pool,
    settings: Settings,
    notice: Notice,
    origin: Literal["http", "kafka"],
) -> StudyAccepted:
    """A CloudEvent study notice: `available` as `receive_study`; `retracted` as `retract_study`."""
    if notice.kind == "available":
        return await receive_study(pool, settings, notice.study, origin, key=notice.key)
    return await retract_study(pool, notice.study, origin, notice.key, settings)


async def _retraction_changed(
    conn: asyncpg.Connection,
    settings: Settings | None,
    cohort: asyncpg.Record,
    uid: str,
    *,
    retracted: bool,
    reason: str,
    notice: int | None = None,
) -> None:
    """Record that the cohort's study `uid` (the original StudyInstanceUID) is retracted, or no
    longer is. Without anonymization in the gateway's own table, which the exporter reads. With it,
    only the anonymizer knows the de-identified study the original became: it is asked on its own
    topic, the UID sealed, and records the retraction under the de-identified UID (ADR 0025). An
    anonymized cohort whose UIDs were kept (`retain_uids`) has the original in its catalog: the
    gateway's table holds the retraction too, as for a cohort without anonymization."""
    anonymized = bool(cohort["anonymization_enabled"])
    if not retracted:
        await repo.unretract_study(conn, cohort["id"], uid)
    elif not anonymized or await repo.keeps_original_uids(conn, cohort["id"]):
        assert notice is not None
        await repo.retract_study(conn, cohort["id"], uid, reason, notice)
    if not anonymized:
        return
    if not retracted and not await repo.was_retracted(conn, cohort["id"], uid):
        return  # nothing to take back: the anonymizer is not told about every new study
    message = StudyRetraction(
        study_instance_uid=seal(uid, settings),
        retracted=retracted,
        reason=reason,
        notice=notice,
    )
    envelope = Envelope.wrap(message, source="gateway", cohort_id=cohort["id"])
    await enqueue(conn, SCHEMA, topics.STUDY_RETRACTIONS, envelope, key=str(cohort["id"]))


async def retract_study(
    pool: asyncpg.Pool,
    study: StudyReceived,
    origin: Literal["http", "kafka"],
    key: NoticeKey | None = None,
    settings: Settings | None = None,
) -> StudyAccepted:
    """Leave a study out of its cohort's next export (recorded, with the reason the sender gave
    in `data.reason`); a later `study.available` for it takes that back. The cohort is the one the
    notice names, else the one the study was last accepted into. Nothing already exported is
    deleted: the next export plans without the study's stacks (`not_exported`: retracted).

    For an anonymized cohort the anonymizer records it under the de-identified study UID, a moment
    later (ADR 0025); the sender's free-text reason stays out of it (it may name the patient): the
    export says who retracted it and the notice's number. Refused (`Invalid`/`NotFound`, recorded)
    without a cohort."""
    uid = study.study_instance_uid.strip()
    extra = study.model_extra or {}
    why = str(extra.get("reason") or "").strip()[:500]
    sender = f"retracted by {key.source if key else origin}"
    reason = sender + (f": {why}" if why else "")
    async with pool.acquire() as conn, conn.transaction():
        if key is not None:
            earlier = await repo.notice_seen(conn, key.source, key.id)
            if earlier is not None:  # a resent retraction: logged, nothing more
                seq = await repo.record_received_study(
                    conn,
                    event_id=None,
                    study_instance_uid=uid or study.study_instance_uid,
                    origin=origin,
                    key=key,
                    cohort_id=earlier["cohort_id"],
                    location=study.location,
                    run_id=None,
                    outcome="duplicate",
                    duplicate_of=earlier["seq"],
                )
                return StudyAccepted(
                    earlier["cohort_id"],
                    uid,
                    study.location,
                    None,
                    outcome="duplicate",
                    seq=seq,
                    duplicate_of=earlier["seq"],
                )
        refused: Invalid | NotFound | None = None
        cohort = None
        if not uid:
            refused = Invalid("study_instance_uid is empty")
        elif study.cohort:
            cohort = await repo.find_cohort(conn, study.cohort)
            if cohort is None:
                refused = NotFound(f"no cohort named or numbered {study.cohort!r}")
        else:
            cohort_id = await conn.fetchval(
                "SELECT cohort_id FROM gateway.received_studies WHERE study_instance_uid = $1"
                " AND outcome = 'accepted' AND cohort_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
                uid,
            )
            cohort = await repo.get_cohort(conn, cohort_id) if cohort_id else None
            if cohort is None:
                refused = Invalid(
                    "no cohort given and the study was never accepted into one: name the cohort"
                )
        notice: dict[str, Any] = {
            "event_id": None,
            "study_instance_uid": uid or study.study_instance_uid,
            "origin": origin,
            "key": key,
            "location": study.location,
            "run_id": None,
        }
        if refused is not None or cohort is None:
            assert refused is not None
            await repo.record_received_study(
                conn, **notice, cohort_id=None, outcome="refused", refused_reason=str(refused)
            )
            raise refused
        await repo.lock_cohort(conn, cohort["id"])
        seq = await repo.record_received_study(
            conn, **notice, cohort_id=cohort["id"], outcome="retracted"
        )
        if cohort["anonymization_enabled"]:
            reason = f"{sender} (notice {seq})"
        await _retraction_changed(
            conn, settings, cohort, uid, retracted=True, reason=reason, notice=seq
        )
    log.info("study retracted", extra={"cohort_id": str(cohort["id"]), "notice": seq})
    return StudyAccepted(cohort["id"], uid, study.location, None, outcome="retracted", seq=seq)


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
    _log_accepted(accepted)


async def on_study_cloudevent(pool: asyncpg.Pool, settings: Settings, notice: Notice) -> None:
    """A CloudEvent on `cohortflow.studies.received` (binary mode): like `POST /api/events`."""
    try:
        accepted = await receive_notice(pool, settings, notice, "kafka")
    except (Invalid, NotFound) as refusal:
        log.warning("study notice refused", extra={"reason": str(refusal)})
        return
    _log_accepted(accepted)


def _log_accepted(accepted: StudyAccepted) -> None:
    log.info(
        "study notice " + accepted.outcome,
        extra={
            "cohort_id": str(accepted.cohort_id),
            "run_id": str(accepted.run.run_id) if accepted.run else None,
            "duplicate_of": accepted.duplicate_of,
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
