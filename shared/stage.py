"""The stage runtime: how every stage service turns a request into items, items into results, and
the last result into the completion event that starts the next stage.

A stage service supplies a `StagePlugin` (plan / process / finalize); this module supplies the
event discipline (ADR 0002) once, for all four stages:

- `StageRequested` -> `plan()` -> run row + item rows + `WorkItem` events, in one transaction.
- `WorkItem` -> `process()` -> item marked done or failed and the run's counters moved, in one
  transaction (a row-level fan-in counter, never memory). Attempts are counted before processing,
  so an item that kills its worker is retried a bounded number of times, then dead-lettered.
- The item that completes the run enqueues a finalize item; `finalize()` then runs once, and the run
  ends with `StageCompleted` (or `StageFailed`) and, when the routing slip has more stages, the next
  stage's `StageRequested` — all through the outbox.
- Cancellation is honoured between items and between files (`ItemContext.check_cancelled`).
- Every handler is idempotent: a redelivered message finds its row done and is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from shared import topics
from shared.broker import partition_key
from shared.db import (
    EVERY_SCHEMA_MIGRATIONS,
    POSTGRES_AWAY,
    migrate,
    relation_exists,
    unreachable,
)
from shared.events import (
    CohortDeleted,
    CohortRef,
    DeadLetter,
    Envelope,
    ItemError,
    JobControl,
    JobHeartbeat,
    JobProgress,
    SlipStep,
    StageCompleted,
    StageFailed,
    StageRequested,
    StudiesPassed,
    WorkItem,
)
from shared.observability import ITEM_SECONDS, ITEMS_PROCESSED, RUNS_ACTIVE
from shared.outbox import enqueue, enqueue_many
from shared.retry import backoff_s
from shared.secrets import is_sealed, seal, unseal
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore
from shared.topics import Stage

log = logging.getLogger(__name__)

FINALIZE_KEY = "__finalize__"
# who processed an item (host:pid), kept on the item row: replicas sharing a run can be told apart
WORKER = f"{socket.gethostname()}:{os.getpid()}"
_MAX_ERRORS_KEPT = 200
# the pipeline run (the gateway's run id) of the message being handled: every event sent on its
# behalf carries it on as `correlation_id` (docs/architecture.md, "Events")
_correlation: ContextVar[uuid.UUID | None] = ContextVar("correlation_id", default=None)

# the runtime's tables (runs, run_items), created in every stage schema by its migrations
STAGE_MIGRATIONS = Path(__file__).with_name("migrations") / "stage"


async def migrate_stage_schema(
    pool: asyncpg.Pool, schema: str, migrations_dir: Path | None
) -> list[str]:
    """Create a stage's schema with the outbox and the runtime tables, then apply the stage's own
    migrations."""
    return await migrate(
        pool, schema, migrations_dir, shared=(EVERY_SCHEMA_MIGRATIONS, STAGE_MIGRATIONS)
    )


class ItemCancelled(Exception):
    """Raised inside `process` when the job was cancelled; the item stops where it is."""


@dataclass
class PlannedItem:
    """One work item a plan produces. `partition_key` keeps related items on one partition."""

    key: str
    data: dict[str, Any] = field(default_factory=dict)
    partition_key: str | None = None


def spread_items(items: list[tuple[PlannedItem, float]], partitions: int) -> list[PlannedItem]:
    """The items in the order to publish them, each on a partition chosen so that the
    partitions' work (`cost`, any measure of an item's time) comes out even: longest processing
    time first, each item onto the partition with the least work so far. A partition is worked
    through in order by one consumer, so hashed keys can leave one consumer with a long tail
    while the others idle; here each partition also starts with its biggest items (ADR 0030)."""
    partitions = max(1, partitions)
    load = [0.0] * partitions
    spread: list[PlannedItem] = []
    for item, cost in sorted(items, key=lambda pair: (-pair[1], pair[0].key)):
        target = min(range(partitions), key=lambda p: (load[p], p))
        load[target] += cost
        item.partition_key = partition_key(target, partitions)
        spread.append(item)
    return spread


@dataclass
class ItemResult:
    """What processing one item produced: counts to add to the run summary, per-file errors."""

    counts: dict[str, int] = field(default_factory=dict)
    errors: list[ItemError] = field(default_factory=list)
    # an item whose every unit failed is a failed item (its errors say why)
    failed: bool = False
    # the studies this item held whole, as the next stage knows them (ADR 0023): when it ends
    # done in a streamed pipeline run they have passed this stage and the next one starts on them
    studies: list[str] = field(default_factory=list)
    # where those studies' objects are, one prefix each under `output_prefix`, for a next stage
    # that reads objects (extraction after anonymization); empty when it reads the catalog
    study_prefixes: list[str] = field(default_factory=list)
    output_prefix: str | None = None


@dataclass
class RunInfo:
    job_id: uuid.UUID
    cohort: CohortRef
    stage: Stage
    config: dict[str, Any]
    request: StageRequested
    items_total: int
    items_done: int
    items_failed: int
    summary: dict[str, Any]


@dataclass
class ItemContext:
    """What `process` gets besides the item: the pool, the settings, and the cancel check."""

    pool: asyncpg.Pool
    settings: Settings
    job_id: uuid.UUID
    is_cancelled: Callable[[], Awaitable[bool]]
    # per-file checks ask the database at most this often (a cancel is seen within it)
    check_interval_s: float = 0.25
    _checked_at: float = field(default=-1e9, repr=False)

    async def check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.check_interval_s:
            return
        if await self.is_cancelled():
            raise ItemCancelled(str(self.job_id))
        self._checked_at = now


class StagePlugin(Protocol):
    """A stage's own work. A plugin may also set `item_workers` (default 1): how many of its items
    one process works on at once (`shared.service.item_consumers`); its `process` must then be
    safe to run concurrently. It may also have `subscriptions(pool)`: topics it handles itself, as
    {topic: envelope handler} (`shared.service.subscribe_stage`; the anonymizer's
    retractions, ADR 0025). A plugin that gives studies new UIDs has `scope_after(request)`: the
    study UIDs a scoped run's next stage works on. And a plugin with worker processes may have `warm_up()` (blocking),
    which the service calls in a thread once it has started, so the first item finds them up. A
    plugin that keeps a cohort's data on its own disk has `async forget_cohort(cohort_id)`, which
    the runtime awaits when the cohort is deleted, after its rows and objects (the exporter's kept
    trees, ADR 0024). In a streamed pipeline run (ADR 0023) a plugin plans the studies that passed
    the stage before, a few at a time, with its scoped plan; one that cannot (its work is
    cohort-wide: the exporter's naming) sets `streams_in = False` and plans once that stage
    closed its run. Its items then say which studies they held whole (`ItemResult.studies`)."""

    stage: Stage
    service: str
    schema: str

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        """The run's work items. Must be idempotent (a redelivered request plans again)."""
        ...

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        """Do one item's work, idempotently (upserts keyed by natural ids)."""
        ...

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        """After the last item: the run summary and the output prefix for the next stage."""
        ...

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        """Object-key prefixes (data bucket) this stage writes for a cohort, removed with it."""
        ...


async def purge_cohort_rows(pool: asyncpg.Pool, schema: str, cohort_id: uuid.UUID) -> int:
    """Delete a cohort's rows from every table of `schema`: tables with a `cohort_id` column by it,
    tables keyed only by `job_id` through the schema's runs. Project-wide tables (neither column:
    pseudonyms, date offsets) stay. One transaction; returns the rows removed."""
    async with pool.acquire() as conn, conn.transaction():
        tables = await conn.fetch(
            "SELECT c.table_name, bool_or(c.column_name = 'cohort_id') AS by_cohort,"
            " bool_or(c.column_name = 'job_id') AS by_job"
            " FROM information_schema.columns c JOIN information_schema.tables t"
            " ON t.table_schema = c.table_schema AND t.table_name = c.table_name"
            " WHERE c.table_schema = $1 AND t.table_type = 'BASE TABLE'"
            " GROUP BY c.table_name ORDER BY c.table_name",
            schema,
        )
        has_runs = any(t["table_name"] == "runs" for t in tables)
        removed = 0
        # rows found through the cohort's runs first, then everything keyed by the cohort (runs too)
        for t in tables:
            if t["by_job"] and not t["by_cohort"] and has_runs:
                status = await conn.execute(
                    f'DELETE FROM {schema}."{t["table_name"]}" WHERE job_id IN'
                    f" (SELECT job_id FROM {schema}.runs WHERE cohort_id = $1)",
                    cohort_id,
                )
                removed += int(status.split()[-1])
        for t in tables:
            if t["by_cohort"]:
                status = await conn.execute(
                    f'DELETE FROM {schema}."{t["table_name"]}" WHERE cohort_id = $1', cohort_id
                )
                removed += int(status.split()[-1])
    return removed


def _servers_away(exc: BaseException) -> bool:
    """A plan() failure that says a server (Postgres, object storage) is away rather than that the
    request cannot be planned. Narrower than `unreachable`: a plan lists sources, and a missing
    folder's `FileNotFoundError` is an `OSError` that no retry mends."""
    return isinstance(exc, (*POSTGRES_AWAY, ConnectionError)) and not isinstance(exc, ValueError)


def _stored_request(request: StageRequested, settings: Settings) -> dict[str, Any]:
    """The request as kept in a run row: a scoped run's study UIDs (originals, before
    anonymization) are sealed, so no table holds them in clear."""
    data = request.model_dump(mode="json")
    data["study_instance_uids"] = [seal(uid, settings) for uid in request.study_instance_uids]
    return data


def _loaded_request(data: dict[str, Any], settings: Settings) -> StageRequested:
    uids = [unseal(u, settings) if is_sealed(u) else u for u in data.get("study_instance_uids", [])]
    return StageRequested.model_validate({**data, "study_instance_uids": uids})


def next_request(
    request: StageRequested, output_prefix: str | None, scope: list[str] | None = None
) -> tuple[SlipStep, StageRequested] | None:
    """The routing slip's next step and its request, once its stage completed `request`; None
    when the slip is empty (the pipeline run ends here). `scope`: the study UIDs the next stage
    works on, when the finished stage changed them (default: the request's)."""
    if not request.slip:
        return None
    step, rest = request.slip[0], request.slip[1:]
    if scope is None:
        scope = request.study_instance_uids
    return step, StageRequested(
        stage=step.stage,
        cohort=request.cohort,
        config=step.config,
        slip=rest,
        study_instance_uids=scope,
        input_prefix=output_prefix or request.input_prefix,
        location=request.location,
    )


# the gateway's published view of each job's cancel
_CONTROL_VIEW = "gateway.job_control_v"


def _progress_due(interval_param: str) -> str:
    """SQL, on a run's row: a progress event is due (none went out in the last `interval_param`
    seconds). `_progress` and the end of an item both throttle by it."""
    return (
        "(last_progress_at IS NULL OR last_progress_at < now()"
        f" - make_interval(secs => {interval_param}))"
    )


def _add_counts(summary: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    merged = dict(summary)
    for k, v in counts.items():
        merged[k] = int(merged.get(k, 0)) + int(v)
    return merged


class StageRuntime:
    """Runs one stage plugin's handlers with the event discipline of ADR 0002."""

    def __init__(
        self, plugin: StagePlugin, pool: asyncpg.Pool, settings: Settings | None = None
    ) -> None:
        self.plugin = plugin
        self.pool = pool
        self.settings = settings or get_settings()
        self.schema = plugin.schema
        self._cancelled: set[uuid.UUID] = set()
        self._relations: set[str] = set()  # the gateway's views seen to exist
        self._in_hand = 0  # items and plans being worked on now
        self._worked_since_beat = False
        self._beating: asyncio.Task[None] | None = None

    # --- heartbeat --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _at_work(self) -> AsyncIterator[None]:
        """Around an item or a plan: heartbeats go out while any is in hand (ADR 0019)."""
        self._in_hand += 1
        self._worked_since_beat = True
        if self._beating is None or self._beating.done():
            self._beating = asyncio.create_task(self._heartbeats())
        try:
            yield
        finally:
            self._in_hand -= 1

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            if not (self._in_hand or self._worked_since_beat):
                continue
            self._worked_since_beat = False
            try:
                await self.heartbeat()
            except Exception:
                log.warning("heartbeat not sent", exc_info=True)

    async def stop_heartbeats(self) -> None:
        """Cancel the heartbeat task (the service is stopping)."""
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
            self._beating = None

    async def heartbeat(self) -> list[uuid.UUID]:
        """Tell the gateway this service is at work on its open runs (the one in hand, and those
        whose items wait behind it); returns their job ids."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT job_id FROM {self.schema}.runs WHERE status IN ('planning', 'running')"
                " ORDER BY updated_at DESC LIMIT 1000"
            )
            job_ids = [r["job_id"] for r in rows]
            if job_ids:
                beat = JobHeartbeat(stage=self.plugin.stage, job_ids=job_ids)
                env = Envelope.wrap(beat, source=self.plugin.service)
                await enqueue(conn, self.schema, topics.JOBS_PROGRESS, env, key=WORKER)
        return job_ids

    # --- events out -------------------------------------------------------------------------

    def _wrap(self, payload: Any, run_cohort: uuid.UUID, job_id: uuid.UUID) -> Envelope:
        return Envelope.wrap(
            payload,
            source=self.plugin.service,
            cohort_id=run_cohort,
            job_id=job_id,
            correlation_id=_correlation.get(),
        )

    async def _progress(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        status: str = "running",
        force: bool = False,
    ) -> None:
        """Enqueue a progress event unless one went out less than `progress_interval_s` ago."""
        if not force:
            due = await conn.fetchval(
                f"UPDATE {self.schema}.runs SET last_progress_at = now() WHERE job_id = $1 AND"
                f" {_progress_due('$2')} RETURNING true",
                row["job_id"],
                self.settings.progress_interval_s,
            )
            if not due:
                return
        payload = JobProgress(
            stage=self.plugin.stage,
            status=status,  # type: ignore[arg-type]
            items_total=row["items_total"],
            items_done=row["items_done"],
            items_failed=row["items_failed"],
            errors=[ItemError(**e) for e in row["errors"][-20:]],
            summary=row["summary"],
            upstream_open=bool(row.get("upstream_open", False)),
        )
        env = self._wrap(payload, row["cohort_id"], row["job_id"])
        await enqueue(conn, self.schema, topics.JOBS_PROGRESS, env, key=str(row["job_id"]))

    def _item_event(
        self, request: StageRequested, job_id: uuid.UUID, item: PlannedItem
    ) -> tuple[str, Envelope, str | None]:
        """(topic, envelope, key) of an item's `WorkItem` event."""
        payload = WorkItem(
            stage=self.plugin.stage,
            cohort=request.cohort,
            item_key=item.key,
            config=request.config,
            data=item.data,
        )
        env = self._wrap(payload, request.cohort.id, job_id)
        return topics.items(self.plugin.stage), env, item.partition_key or item.key

    async def _publish_items(
        self,
        conn: asyncpg.Connection,
        request: StageRequested,
        job_id: uuid.UUID,
        items: Sequence[PlannedItem],
    ) -> None:
        """The items' `WorkItem` events, in one batch (a plan's round trips are per batch)."""
        await enqueue_many(
            conn, self.schema, [self._item_event(request, job_id, item) for item in items]
        )

    # --- requested ----------------------------------------------------------------------------

    async def handle_requested(self, envelope: Envelope) -> None:
        _correlation.set(envelope.correlation_id)
        if envelope.type == StudiesPassed.__name__:
            await self.handle_passed(envelope)
            return
        request: StageRequested = envelope.open(StageRequested)
        if request.stage != self.plugin.stage:
            return
        job_id = envelope.job_id or envelope.id
        if request.slip and not request.streamed and self.settings.stream_stages:
            # the first stage of a pipeline run: its studies stream through the stages after it
            request = request.model_copy(update={"streamed": True})
        async with self.pool.acquire() as conn:
            status = await conn.fetchval(
                f"SELECT status FROM {self.schema}.runs WHERE job_id = $1", job_id
            )
        if status not in (None, "planning"):
            log.info("run already planned", extra={"job_id": str(job_id), "status": status})
            return
        if await self.is_cancelled(job_id):
            await self._insert_run(job_id, request, "cancelled")
            return
        if request.upstream_open:
            await self._open_run(job_id, request)
            return
        await self._insert_run(job_id, request, "planning")
        attempts = await self._count_plan_attempt(job_id)
        if attempts is None:
            return  # planned or ended meanwhile
        if attempts > self.settings.item_max_attempts:  # each earlier one ended the service
            error = f"planning gave up after {attempts - 1} attempts that did not finish"
            await self._fail_run(
                job_id, request, error, dead_letter=(envelope, error, attempts - 1)
            )
            return
        async with self._at_work():
            await self._plan(envelope, request, job_id, attempts)

    async def _plan(
        self, envelope: Envelope, request: StageRequested, job_id: uuid.UUID, attempts: int
    ) -> None:
        log.info("planning run", extra={"job_id": str(job_id), "stage": self.plugin.stage.value})
        outcome = await self._plan_retried(
            envelope,
            request,
            request,
            job_id,
            attempts,
            next_attempt=lambda _: self._count_plan_attempt(job_id),
            away=lambda counted: self._give_plan_attempt_back(job_id, counted),
        )
        if outcome is None:
            return  # gave up (the run failed), or planned or ended meanwhile
        planned, attempts = outcome
        try:
            await self._store_plan(request, job_id, planned)
        except Exception as exc:
            if unreachable(exc):
                # the database went away: no fault of this request, which comes back as often as
                # it takes (the attempt is given back if the database answers again in time)
                await self._give_plan_attempt_back(job_id, attempts)
                raise
            # the plan holds a value the database cannot store: the request comes back a bounded
            # number of times, like a work item (ADR 0002), then the run fails
            error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "storing the plan failed",
                extra={"job_id": str(job_id), "attempt": attempts, "error": error},
            )
            if attempts >= self.settings.item_max_attempts:
                await self._fail_run(
                    job_id,
                    request,
                    f"planning gave up after {attempts} attempts to store the plan: {error}",
                    dead_letter=(envelope, error, attempts),
                )
                return
            await asyncio.sleep(backoff_s(attempts))
            raise

    async def _give_plan_attempt_back(self, job_id: uuid.UUID, attempts: int) -> None:
        """A server was away while planning: the attempt does not count (when the database
        answers again in time to take it back), and the request comes again after a pause."""
        with contextlib.suppress(Exception):
            await self._count_plan_attempt(job_id, -1)
        await asyncio.sleep(backoff_s(attempts))

    async def _count_plan_attempt(self, job_id: uuid.UUID, step: int = 1) -> int | None:
        """Count a planning attempt before it is made (a service killed while planning used one;
        `step=-1` gives one back); None when the run is no longer being planned."""
        async with self.pool.acquire() as conn:
            attempts: int | None = await conn.fetchval(
                f"UPDATE {self.schema}.runs SET plan_attempts = plan_attempts + $2,"
                " updated_at = now() WHERE job_id = $1 AND status = 'planning'"
                " RETURNING plan_attempts",
                job_id,
                step,
            )
        return attempts

    async def _store_plan(
        self, request: StageRequested, job_id: uuid.UUID, planned: list[PlannedItem]
    ) -> None:
        """Item rows, the run's total and the `WorkItem` events, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                f"INSERT INTO {self.schema}.run_items (job_id, item_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(job_id, p.key) for p in planned],
            )
            row = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET status = 'running', items_total = $2, updated_at = now()"
                " WHERE job_id = $1 AND status = 'planning' RETURNING *",
                job_id,
                len(planned),
            )
            if row is None:  # planned concurrently by a redelivery
                return
            await self._publish_items(conn, request, job_id, planned)
            await self._progress(conn, row, force=True)
            if request.streamed:
                await self._open_next(conn, request)
            if not planned:
                await self._enqueue_finalize(conn, request, job_id)
        RUNS_ACTIVE.labels(self.plugin.stage.value).inc()
        log.info("run planned", extra={"job_id": str(job_id), "items": len(planned)})

    # --- items ----------------------------------------------------------------------------------

    async def handle_item(self, envelope: Envelope) -> None:
        _correlation.set(envelope.correlation_id)
        try:
            item: WorkItem = envelope.open(WorkItem)
        except ValueError as exc:  # a pydantic ValidationError too
            await self._unreadable_item(envelope, exc)
            return
        if item.stage != self.plugin.stage:
            return
        job_id = envelope.job_id
        assert job_id is not None, "work items always carry their job id"
        if item.item_key == FINALIZE_KEY:
            async with self._at_work():  # a finalize can take minutes too (stacks, validation)
                await self._finalize(job_id)
            return
        # the attempt counted, the run's status and the gateway's cancel read on one connection
        # (an item's fixed cost is its round trips)
        async with self.pool.acquire() as conn:
            started = await conn.fetchrow(
                f"UPDATE {self.schema}.run_items i SET attempts = i.attempts + 1, updated_at = now()"
                f" FROM {self.schema}.runs r WHERE i.job_id = $1 AND i.item_key = $2"
                " AND i.status = 'pending' AND r.job_id = i.job_id RETURNING i.attempts, r.status",
                job_id,
                item.item_key,
            )
            if started is None or started["status"] != "running":
                return  # already done (redelivery), unknown, or the run ended
            attempts: int = started["attempts"]
            cancelled = job_id in self._cancelled
            by_gateway = not cancelled and await self._gateway_cancelled(conn, job_id)
        if by_gateway:
            await self._cancel_run(job_id)
        if cancelled or by_gateway:
            await self._end_item(job_id, item.item_key, "cancelled", ItemResult(), None)
            return
        if attempts > self.settings.item_max_attempts:
            await self._dead_letter(job_id, item, f"gave up after {attempts - 1} attempts")
            return
        async with self._at_work():
            await self._process(job_id, item, attempts)

    async def _process(self, job_id: uuid.UUID, item: WorkItem, attempts: int) -> None:
        """Process an item, retrying in place up to the attempts; then end it done or failed."""
        ctx = ItemContext(self.pool, self.settings, job_id, lambda: self.is_cancelled(job_id))
        started = time.monotonic()
        while True:
            try:
                result = await self.plugin.process(ctx, item)
            except ItemCancelled:
                await self._end_item(job_id, item.item_key, "cancelled", ItemResult(), None)
                return
            except Exception as exc:
                log.warning(
                    "item failed",
                    extra={
                        "job_id": str(job_id),
                        "item": item.item_key,
                        "attempt": attempts,
                        "error": str(exc),
                    },
                    exc_info=True,
                )
                if attempts >= self.settings.item_max_attempts:
                    await self._dead_letter(job_id, item, f"{type(exc).__name__}: {exc}")
                    return
                attempts = await self._count_attempt(job_id, item.item_key) or attempts + 1
                await asyncio.sleep(backoff_s(attempts))
                continue
            break
        ITEM_SECONDS.labels(self.plugin.stage.value).observe(time.monotonic() - started)
        await self._end_item(
            job_id, item.item_key, "failed" if result.failed else "done", result, None
        )

    async def _unreadable_item(self, envelope: Envelope, exc: ValueError) -> None:
        """A work item whose envelope is valid but whose payload is not: no attempt could read it
        differently, so its one attempt is counted and it is dead-lettered at once (and, when its
        row is known, failed, so its run still ends). Never raised: redelivering it would block
        its partition (one record per poll) forever."""
        error = f"not a valid {WorkItem.__name__}: {exc}"[:2000]
        payload = envelope.payload if isinstance(envelope.payload, dict) else {}
        key = payload.get("item_key")
        job_id = envelope.job_id
        log.error(
            "unreadable work item dead-lettered",
            extra={"job_id": str(job_id), "item": key, "type": envelope.type},
        )
        letter = DeadLetter(
            topic=topics.items(self.plugin.stage), error=error, attempts=1, original=payload
        )
        env = Envelope.wrap(
            letter,
            source=self.plugin.service,
            cohort_id=envelope.cohort_id,
            job_id=job_id,
            correlation_id=envelope.correlation_id,
        )
        if job_id is not None and isinstance(key, str) and key != FINALIZE_KEY:
            if await self._count_attempt(job_id, key) is None:
                return  # its row already ended (a redelivery) or is unknown, like a good item's
            result = ItemResult(errors=[ItemError(item=key, message=error)], failed=True)
            await self._end_item(
                job_id, key, "failed", result, (topics.dlq(self.plugin.stage), env)
            )
            return
        async with self.pool.acquire() as conn:  # no job or key to find a row by: the letter alone
            await enqueue(
                conn,
                self.schema,
                topics.dlq(self.plugin.stage),
                env,
                key=str(key) if key is not None else None,
            )

    async def _count_attempt(self, job_id: uuid.UUID, item_key: str) -> int | None:
        """Count an attempt before it is made (a worker killed mid-item still used one);
        None when the item is no longer pending."""
        async with self.pool.acquire() as conn:
            attempts: int | None = await conn.fetchval(
                f"UPDATE {self.schema}.run_items SET attempts = attempts + 1, updated_at = now()"
                " WHERE job_id = $1 AND item_key = $2 AND status = 'pending' RETURNING attempts",
                job_id,
                item_key,
            )
        return attempts

    async def _dead_letter(self, job_id: uuid.UUID, item: WorkItem, error: str) -> None:
        letter = DeadLetter(
            topic=topics.items(self.plugin.stage),
            error=error,
            attempts=self.settings.item_max_attempts,
            original=item.model_dump(mode="json"),
        )
        env = self._wrap(letter, item.cohort.id, job_id)
        await self._end_item(
            job_id,
            item.item_key,
            "failed",
            ItemResult(errors=[ItemError(item=item.item_key, message=error)], failed=True),
            (topics.dlq(self.plugin.stage), env),
        )

    async def _end_item(
        self,
        job_id: uuid.UUID,
        item_key: str,
        status: str,
        result: ItemResult,
        extra_event: tuple[str, Envelope] | None,
    ) -> None:
        """Mark the item, move the run's counters, and, for the last item, schedule finalize."""
        failed = status == "failed"
        ITEMS_PROCESSED.labels(self.plugin.stage.value, status).inc()
        errors = [e.model_dump() for e in result.errors]
        async with self.pool.acquire() as conn, conn.transaction():
            # the item flipped from pending (else nothing: a redelivery) and its run's row locked,
            # in that order, in one statement (an item's fixed cost is its round trips)
            current = await conn.fetchrow(
                f"WITH ended AS (UPDATE {self.schema}.run_items SET status = $3, error = $4,"
                " result = $5, worker = $6, updated_at = now()"
                " WHERE job_id = $1 AND item_key = $2 AND status = 'pending' RETURNING job_id)"
                f" SELECT r.summary, r.errors FROM {self.schema}.runs r JOIN ended USING (job_id)"
                " FOR UPDATE OF r",
                job_id,
                item_key,
                status,
                "; ".join(e["message"] for e in errors)[:2000] or None,
                {"counts": result.counts},
                WORKER,
            )
            if current is None:
                return
            summary = _add_counts(current["summary"], result.counts)
            kept = (current["errors"] + errors)[:_MAX_ERRORS_KEPT]
            # the counters, and whether a progress event is due (`_progress`'s throttle, read
            # and moved here: the column is set to now() exactly when one is due)
            row = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET items_done = items_done + $2, items_failed = items_failed + $3,"
                " summary = $4, errors = $5, updated_at = now(), last_progress_at = CASE WHEN"
                f" {_progress_due('$6')} THEN now() ELSE last_progress_at END"
                " WHERE job_id = $1 RETURNING *, last_progress_at = now() AS progress_due",
                job_id,
                0 if failed else 1,
                1 if failed else 0,
                summary,
                kept,
                self.settings.progress_interval_s,
            )
            if extra_event is not None:
                await enqueue(conn, self.schema, extra_event[0], extra_event[1], key=item_key)
            last = (
                row["items_done"] + row["items_failed"] >= row["items_total"]
                and not row["upstream_open"]
            )
            if row["status"] == "running" and (last or row["progress_due"]):
                await self._progress(conn, row, force=True)
            passed = status == "done" and bool(result.studies or result.study_prefixes)
            if row["status"] == "running" and (last or passed):
                request = _loaded_request(row["request"], self.settings)
                if passed and request.streamed:
                    await self._pass_studies(conn, request, result)
                if last:
                    await self._enqueue_finalize(conn, request, job_id)

    async def _enqueue_finalize(
        self, conn: asyncpg.Connection, request: StageRequested, job_id: uuid.UUID
    ) -> None:
        await self._publish_items(
            conn, request, job_id, [PlannedItem(key=FINALIZE_KEY, partition_key=str(job_id))]
        )

    # --- finalize ---------------------------------------------------------------------------------

    async def _finalize(self, job_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT * FROM {self.schema}.runs WHERE job_id = $1", job_id)
        if row is None or row["status"] != "running":
            return
        request = _loaded_request(row["request"], self.settings)
        run = RunInfo(
            job_id=job_id,
            cohort=request.cohort,
            stage=self.plugin.stage,
            config=request.config,
            request=request,
            items_total=row["items_total"],
            items_done=row["items_done"],
            items_failed=row["items_failed"],
            summary=row["summary"],
        )
        try:
            extra_summary, output_prefix = await self.plugin.finalize(self.pool, run)
        except Exception as exc:
            log.exception("finalize failed", extra={"job_id": str(job_id)})
            await self._fail_run(job_id, request, f"finalize failed: {exc}")
            return
        all_failed = run.items_total > 0 and run.items_failed >= run.items_total
        summary = {**row["summary"], **extra_summary}
        async with self.pool.acquire() as conn, conn.transaction():
            ended = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET status = $2, summary = $3, finished_at = now(), updated_at = now()"
                " WHERE job_id = $1 AND status = 'running' RETURNING *",
                job_id,
                "failed" if all_failed else "completed",
                summary,
            )
            if ended is None:
                return
            errors = [ItemError(**e) for e in ended["errors"]]
            if all_failed:
                await self._enqueue_failed(
                    conn, request, job_id, "every item failed", ended, errors
                )
            else:
                done = StageCompleted(
                    stage=self.plugin.stage,
                    cohort=request.cohort,
                    items_total=ended["items_total"],
                    items_done=ended["items_done"],
                    items_failed=ended["items_failed"],
                    summary=summary,
                    output_prefix=output_prefix,
                    slip=request.slip,
                    errors=errors[:_MAX_ERRORS_KEPT],
                )
                env = self._wrap(done, request.cohort.id, job_id)
                await enqueue(
                    conn,
                    self.schema,
                    topics.completed(self.plugin.stage),
                    env,
                    key=str(request.cohort.id),
                )
                await self._progress(conn, ended, status="completed", force=True)
                await self._advance_slip(conn, request, output_prefix)
        RUNS_ACTIVE.labels(self.plugin.stage.value).dec()
        log.info(
            "run ended",
            extra={"job_id": str(job_id), "status": ended["status"], "summary": summary},
        )

    def _following(
        self, request: StageRequested, output_prefix: str | None
    ) -> tuple[SlipStep, StageRequested] | None:
        """The routing slip's next step and its request (`next_request`)."""
        # a stage that gives studies new UIDs (anonymization) says what the scope becomes:
        # original UIDs must not travel past it
        scope_after = getattr(self.plugin, "scope_after", None)
        scope = scope_after(request) if scope_after is not None else None
        return next_request(request, output_prefix, scope)

    async def _send_next(
        self, conn: asyncpg.Connection, request: StageRequested, step: SlipStep, payload: Any
    ) -> None:
        """An event to the next stage of the slip: on its requested topic, keyed by the cohort
        (so it follows that stage's own request), about its job."""
        env = Envelope.wrap(
            payload,
            source=self.plugin.service,
            cohort_id=request.cohort.id,
            job_id=step.job_id,
            correlation_id=_correlation.get(),
        )
        await enqueue(
            conn, self.schema, topics.requested(step.stage), env, key=str(request.cohort.id)
        )

    async def _advance_slip(
        self, conn: asyncpg.Connection, request: StageRequested, output_prefix: str | None
    ) -> None:
        """Request the next stage of the routing slip, if any; in a streamed run, close its open
        run with the request it would have got (scope and input prefix)."""
        following = self._following(request, output_prefix)
        if following is None:
            return
        step, nxt = following
        if not request.streamed:
            await self._send_next(conn, request, step, nxt)
            return
        closing = StudiesPassed(
            stage=step.stage,
            cohort=request.cohort,
            study_instance_uids=nxt.study_instance_uids,
            input_prefix=nxt.input_prefix,
            closed=True,
        )
        await self._send_next(conn, request, step, closing)

    # --- streaming (ADR 0023) ---------------------------------------------------------------------

    async def _open_next(self, conn: asyncpg.Connection, request: StageRequested) -> None:
        """A streamed run's next stage gets its run now, open: its studies follow as they pass."""
        following = self._following(request, None)
        if following is not None:
            step, nxt = following
            opening = nxt.model_copy(update={"streamed": True, "upstream_open": True})
            await self._send_next(conn, request, step, opening)

    async def _pass_studies(
        self, conn: asyncpg.Connection, request: StageRequested, result: ItemResult
    ) -> None:
        """Studies an item held whole passed this stage: the next stage's open run plans them."""
        if not request.slip:
            return
        step = request.slip[0]
        passed = StudiesPassed(
            stage=step.stage,
            cohort=request.cohort,
            study_instance_uids=result.studies,
            study_prefixes=result.study_prefixes,
            input_prefix=result.output_prefix,
        )
        await self._send_next(conn, request, step, passed)

    async def _open_run(self, job_id: uuid.UUID, request: StageRequested) -> None:
        """An open run of a streamed pipeline: no items yet, shown running (waiting for studies)
        from now on; the stage after it gets its open run in the same transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"INSERT INTO {self.schema}.runs (job_id, cohort_id, stage, request, status, upstream_open)"
                " VALUES ($1, $2, $3, $4, 'running', true) ON CONFLICT (job_id) DO NOTHING RETURNING *",
                job_id,
                request.cohort.id,
                self.plugin.stage.value,
                _stored_request(request, self.settings),
            )
            if row is None:
                return  # a redelivery
            await self._progress(conn, row, force=True)
            await self._open_next(conn, request)
        RUNS_ACTIVE.labels(self.plugin.stage.value).inc()
        log.info("run opened", extra={"job_id": str(job_id), "stage": self.plugin.stage.value})

    async def handle_passed(self, envelope: Envelope) -> None:
        """Studies that passed the stage before, for this stage's open run: planned (the
        plugin's scoped plan) and appended to the run. The closing one plans what its request
        covers that is not planned yet (items are keyed: none twice) and ends the wait."""
        passed = envelope.open(StudiesPassed)
        job_id = envelope.job_id
        if passed.stage != self.plugin.stage or job_id is None:
            return
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT * FROM {self.schema}.runs WHERE job_id = $1", job_id)
        if row is None or row["status"] != "running" or not row["upstream_open"]:
            log.info("studies passed to no open run", extra={"job_id": str(job_id)})
            return
        stored = _loaded_request(row["request"], self.settings)
        if passed.abandoned is not None:
            await self._abandon(job_id, stored, passed.abandoned)
            return
        scoped = bool(passed.study_instance_uids or passed.study_prefixes)
        if not passed.closed and (not scoped or not getattr(self.plugin, "streams_in", True)):
            return  # this stage plans once the stage before closed its run
        request = stored.model_copy(
            update={
                "study_instance_uids": passed.study_instance_uids,
                "study_prefixes": passed.study_prefixes,
                "input_prefix": passed.input_prefix or stored.input_prefix,
                "upstream_open": False,
            }
        )
        async with self._at_work():
            planned = await self._plan_passed(envelope, request, stored, job_id)
            if planned is not None:
                await self._append(request, job_id, planned, passed.closed)

    async def _plan_retried(
        self,
        envelope: Envelope,
        request: StageRequested,
        failing: StageRequested,
        job_id: uuid.UUID,
        attempts: int,
        next_attempt: Callable[[int], Awaitable[int | None]],
        away: Callable[[int], Awaitable[None]],
    ) -> tuple[list[PlannedItem], int] | None:
        """The plugin's plan of `request`, retried in place within the attempts like a work
        item's `process`; then the run (`failing`) fails and the message is dead-lettered (kind
        `plan`: ADR 0022 replays it). `next_attempt` counts the next attempt (None: the run was
        planned or ended meanwhile); `away` runs before re-raising when a server is away (no
        fault of the request). Returns the plan and the attempts it took, or None."""
        while True:
            try:
                return await self.plugin.plan(self.pool, request, job_id), attempts
            except Exception as exc:
                if _servers_away(exc):
                    await away(attempts)
                    raise
                error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "planning failed",
                    extra={
                        "job_id": str(job_id),
                        "attempt": attempts,
                        "error": error,
                        "studies": len(request.study_instance_uids) + len(request.study_prefixes),
                    },
                    exc_info=True,
                )
                if attempts >= self.settings.item_max_attempts:
                    await self._fail_run(
                        job_id,
                        failing,
                        f"planning failed after {attempts} attempts: {exc}",
                        dead_letter=(envelope, error, attempts),
                    )
                    return None
                counted = await next_attempt(attempts)
                if counted is None:
                    return None
                attempts = counted
                await asyncio.sleep(backoff_s(attempts))

    async def _plan_passed(
        self,
        envelope: Envelope,
        request: StageRequested,
        stored: StageRequested,
        job_id: uuid.UUID,
    ) -> list[PlannedItem] | None:
        """The plan of passed studies, retried in place like a run's plan (attempts counted in
        memory: the message is redelivered whole); None when it gave up (the run failed, the
        message is dead-lettered)."""

        async def one_more(attempts: int) -> int:
            return attempts + 1

        async def pause(_: int) -> None:
            await asyncio.sleep(backoff_s(1))

        outcome = await self._plan_retried(
            envelope, request, stored, job_id, 1, next_attempt=one_more, away=pause
        )
        return None if outcome is None else outcome[0]

    async def _append(
        self, request: StageRequested, job_id: uuid.UUID, planned: list[PlannedItem], closed: bool
    ) -> None:
        """Items of passed studies added to the open run (an item planned before is not added
        again), in one transaction with their events; the closing one ends the wait and, when
        every item has ended, schedules finalize."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT * FROM {self.schema}.runs WHERE job_id = $1 FOR UPDATE", job_id
            )
            if row is None or row["status"] != "running" or not row["upstream_open"]:
                return  # ended, or closed by a redelivery of this message
            # keys planned before are left out by a read, not by the insert's conflict check:
            # that check waits for an item whose end is being written, whose transaction waits
            # for this run row (locked above), a deadlock Postgres breaks by failing one of the
            # two (a closing plan names every item planned before, those in hand too). New keys
            # cannot race: every append to a run holds its row.
            inserted = await conn.fetch(
                f"INSERT INTO {self.schema}.run_items (job_id, item_key)"
                " SELECT $1, k FROM unnest($2::text[]) AS k WHERE NOT EXISTS"
                f" (SELECT 1 FROM {self.schema}.run_items i WHERE i.job_id = $1 AND i.item_key = k)"
                " ON CONFLICT DO NOTHING RETURNING item_key",
                job_id,
                [p.key for p in planned],
            )
            new_keys = {r["item_key"] for r in inserted}
            new = [p for p in planned if p.key in new_keys]
            row = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET items_total = items_total + $2, upstream_open = $3,"
                " updated_at = now() WHERE job_id = $1 RETURNING *",
                job_id,
                len(new),
                not closed,
            )
            await self._publish_items(conn, request, job_id, new)
            last = closed and row["items_done"] + row["items_failed"] >= row["items_total"]
            await self._progress(conn, row, force=closed or bool(new))
            if last:
                await self._enqueue_finalize(conn, request, job_id)
        log.info(
            "studies passed planned",
            extra={"job_id": str(job_id), "items": len(new), "closed": closed},
        )

    async def _abandon(self, job_id: uuid.UUID, request: StageRequested, reason: str) -> None:
        """The stage before failed: this open run ends cancelled (the gateway cancelled its job
        already) and so does the next one."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET status = 'cancelled', finished_at = now(),"
                " updated_at = now(), errors = errors || $2::jsonb"
                " WHERE job_id = $1 AND status IN ('planning', 'running') RETURNING *",
                job_id,
                [{"item": "run", "message": reason}],
            )
            if row is None:
                return
            await self._abandon_next(conn, request, reason)
        RUNS_ACTIVE.labels(self.plugin.stage.value).dec()

    async def _abandon_next(
        self, conn: asyncpg.Connection, request: StageRequested, reason: str
    ) -> None:
        """A streamed run that failed ends the open runs after it."""
        if request.streamed and request.slip:
            step = request.slip[0]
            abandoned = StudiesPassed(
                stage=step.stage, cohort=request.cohort, closed=True, abandoned=reason
            )
            await self._send_next(conn, request, step, abandoned)

    async def _enqueue_failed(
        self,
        conn: asyncpg.Connection,
        request: StageRequested,
        job_id: uuid.UUID,
        error: str,
        row: asyncpg.Record | None,
        errors: list[ItemError],
    ) -> None:
        failed = StageFailed(
            stage=self.plugin.stage,
            cohort=request.cohort,
            error=error,
            items_total=row["items_total"] if row else 0,
            items_done=row["items_done"] if row else 0,
            items_failed=row["items_failed"] if row else 0,
            errors=errors[:50],
            slip=request.slip,
        )
        env = self._wrap(failed, request.cohort.id, job_id)
        await enqueue(
            conn, self.schema, topics.failed(self.plugin.stage), env, key=str(request.cohort.id)
        )
        await self._abandon_next(conn, request, f"{self.plugin.stage.value} failed: {error}")

    async def _fail_run(
        self,
        job_id: uuid.UUID,
        request: StageRequested,
        error: str,
        dead_letter: tuple[Envelope, str, int] | None = None,
    ) -> None:
        """The run ends as failed with `error`; `dead_letter` (the message given up on, why,
        after how many attempts) also goes to the stage's dead-letter topic."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE {self.schema}.runs SET status = 'failed', finished_at = now(), updated_at = now(),"
                " errors = errors || $2::jsonb WHERE job_id = $1 AND status IN ('planning', 'running') RETURNING *",
                job_id,
                [{"item": "run", "message": error}],
            )
            if row is None:
                return
            await self._enqueue_failed(
                conn, request, job_id, error, row, [ItemError(item="run", message=error)]
            )
            if dead_letter is not None:
                original, why, attempts = dead_letter
                letter = DeadLetter(
                    topic=topics.requested(self.plugin.stage),
                    error=why,
                    attempts=attempts,
                    original=original.model_dump(mode="json"),
                )
                env = self._wrap(letter, request.cohort.id, job_id)
                await enqueue(
                    conn, self.schema, topics.dlq(self.plugin.stage), env, key=str(job_id)
                )

    # --- cancellation -----------------------------------------------------------------------------

    async def handle_cohort_deleted(self, envelope: Envelope) -> None:
        """A deleted cohort: its rows in this schema and its objects in this stage's zone go.
        Idempotent, so a redelivery (or a replica catching up from the beginning) is harmless."""
        deleted = envelope.open(CohortDeleted)
        rows = await purge_cohort_rows(self.pool, self.schema, deleted.cohort_id)
        store = ObjectStore(self.settings)
        objects = 0
        for prefix in self.plugin.cohort_prefixes(deleted.cohort_id):
            objects += await asyncio.to_thread(store.delete_prefix, prefix.rstrip("/") + "/")
        forget = getattr(self.plugin, "forget_cohort", None)
        if forget is not None:
            await forget(deleted.cohort_id)
        log.info(
            "cohort purged",
            extra={"cohort_id": str(deleted.cohort_id), "rows": rows, "objects": objects},
        )

    async def handle_control(self, envelope: Envelope) -> None:
        control: JobControl = envelope.open(JobControl)
        if control.action == "cancel" and envelope.job_id is not None:
            await self._cancel_run(envelope.job_id)

    async def _cancel_run(self, job_id: uuid.UUID) -> None:
        """The run ends as cancelled: no finalize, no completion event, no next stage."""
        self._cancelled.add(job_id)
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"UPDATE {self.schema}.runs SET status = 'cancelled', finished_at = now(), updated_at = now()"
                " WHERE job_id = $1 AND status IN ('planning', 'running')",
                job_id,
            )

    async def is_cancelled(self, job_id: uuid.UUID) -> bool:
        """Cancelled by a control event seen here, or in the gateway's published view."""
        if job_id in self._cancelled:
            return True
        async with self.pool.acquire() as conn:
            if await relation_exists(conn, _CONTROL_VIEW, self._relations):  # one round trip
                row = await conn.fetchrow(
                    f"SELECT (SELECT status FROM {self.schema}.runs WHERE job_id = $1) AS status,"
                    f" (SELECT cancelled FROM {_CONTROL_VIEW} WHERE job_id = $1) AS cancelled",
                    job_id,
                )
                status, cancelled = row["status"], row["cancelled"]
            else:
                status = await conn.fetchval(
                    f"SELECT status FROM {self.schema}.runs WHERE job_id = $1", job_id
                )
                cancelled = False
        if status == "cancelled":
            self._cancelled.add(job_id)
            return True
        if cancelled:
            await self._cancel_run(job_id)
            return True
        return False

    async def _gateway_cancelled(self, conn: asyncpg.Connection, job_id: uuid.UUID) -> bool:
        """Whether the gateway's published view says the job is cancelled (False while the
        view does not exist)."""
        if not await relation_exists(conn, _CONTROL_VIEW, self._relations):
            return False
        return bool(
            await conn.fetchval(f"SELECT cancelled FROM {_CONTROL_VIEW} WHERE job_id = $1", job_id)
        )

    async def _insert_run(self, job_id: uuid.UUID, request: StageRequested, status: str) -> None:
        """The run's row (once: a redelivered request finds it there)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self.schema}.runs (job_id, cohort_id, stage, request, status, finished_at)"
                " VALUES ($1, $2, $3, $4, $5, CASE WHEN $5 = 'cancelled' THEN now() END)"
                " ON CONFLICT (job_id) DO NOTHING",
                job_id,
                request.cohort.id,
                self.plugin.stage.value,
                _stored_request(request, self.settings),
                status,
            )
