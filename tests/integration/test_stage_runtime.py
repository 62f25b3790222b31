"""The stage runtime's delivery rules on the real Postgres, with a minimal plugin: a request whose
plan cannot be made or stored is retried a bounded number of times, then the run fails with the
reason and the request is dead-lettered; a work item whose worker vanished is taken up again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from services.gateway.dead_letters import letter_kind
from shared import stage as stage_module
from shared import topics
from shared.db import create_pool
from shared.events import (
    CohortRef,
    DeadLetter,
    Envelope,
    StageRequested,
    StudiesPassed,
    WorkItem,
)
from shared.settings import Settings
from shared.stage import (
    ItemContext,
    ItemResult,
    PlannedItem,
    RunInfo,
    StageRuntime,
    migrate_stage_schema,
)
from shared.topics import Stage

pytestmark = pytest.mark.integration


@dataclass
class ListPlugin:
    """Plans the given item keys; processing an item counts it."""

    schema: str
    keys: list[str]
    stage: Stage = Stage.sorting
    service: str = "runtime-probe"

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        return [PlannedItem(key=k) for k in self.keys]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        return ItemResult(counts={"processed": 1})

    async def finalize(self, pool: asyncpg.Pool, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        return {}, None

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        return []


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db_pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The services' pool (JSON codecs and all)."""
    pool = await create_pool(stack_settings)
    try:
        yield pool
    finally:
        await pool.close()


async def _runtime(
    db_pool: asyncpg.Pool, settings: Settings, keys: list[str]
) -> tuple[StageRuntime, str]:
    schema = f"rt_{uuid.uuid4().hex[:10]}"
    await migrate_stage_schema(db_pool, schema, None)
    runtime = StageRuntime(ListPlugin(schema, keys), db_pool, settings)
    return runtime, schema


def _request() -> Envelope:
    cohort = CohortRef(id=uuid.uuid4(), name="probe", source_path="/nowhere")
    return Envelope.wrap(
        StageRequested(stage=Stage.sorting, cohort=cohort),
        source="test",
        cohort_id=cohort.id,
        job_id=uuid.uuid4(),
    )


async def _outbox_topics(db_pool: asyncpg.Pool, schema: str) -> list[str]:
    """The events a run sent, but progress and heartbeats."""
    rows = await db_pool.fetch(
        f"SELECT topic FROM {schema}.outbox WHERE topic <> $1 ORDER BY seq", topics.JOBS_PROGRESS
    )
    return [r["topic"] for r in rows]


# values the item rows' insert refuses every time (a poison request): Postgres text cannot hold
# NUL (refused by the server); a lone surrogate, what a non-UTF-8 file name decodes to, cannot be
# encoded (refused by the client, with an error of the family that also means "connection lost")
@pytest.mark.parametrize("bad_key", ["bad\x00key", "bad\udcffkey"], ids=["nul", "surrogate"])
async def test_a_plan_that_cannot_be_stored_fails_the_run_after_the_attempts(
    db_pool: asyncpg.Pool,
    stack_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    bad_key: str,
) -> None:
    monkeypatch.setattr(stage_module, "backoff_s", lambda attempts: 0.0)
    settings = stack_settings.model_copy(update={"item_max_attempts": 3})
    runtime, schema = await _runtime(db_pool, settings, ["fine", bad_key])
    request = _request()
    try:
        for _ in range(2):  # raised: the message is nacked and comes back
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await runtime.handle_requested(request)
        await runtime.handle_requested(request)  # the last attempt: given up, acknowledged
        await runtime.handle_requested(request)  # a late redelivery changes nothing

        run = await db_pool.fetchrow(
            f"SELECT status, plan_attempts, errors FROM {schema}.runs WHERE job_id = $1",
            request.job_id,
        )
        assert run["status"] == "failed" and run["plan_attempts"] == 3
        reason = run["errors"][0]["message"]
        assert reason.startswith("planning gave up after 3 attempts to store the plan:")
        assert await db_pool.fetchval(f"SELECT count(*) FROM {schema}.run_items") == 0
        assert await _outbox_topics(db_pool, schema) == [
            topics.failed(Stage.sorting),
            topics.dlq(Stage.sorting),
        ]
        letter = await db_pool.fetchval(
            f"SELECT envelope FROM {schema}.outbox WHERE topic = $1", topics.dlq(Stage.sorting)
        )
        assert str(request.id) in str(letter)  # the original request, for whoever replays it
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class FailingPlan(ListPlugin):
    """plan() itself raises, every time (a source it cannot read)."""

    calls: int = 0

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        self.calls += 1
        raise RuntimeError("the source listing is corrupt")


async def test_a_plan_that_raises_fails_the_run_after_the_attempts_and_is_dead_lettered(
    db_pool: asyncpg.Pool, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage_module, "backoff_s", lambda attempts: 0.0)
    settings = stack_settings.model_copy(update={"item_max_attempts": 3})
    schema = f"rt_{uuid.uuid4().hex[:10]}"
    await migrate_stage_schema(db_pool, schema, None)
    plugin = FailingPlan(schema, [])
    runtime = StageRuntime(plugin, db_pool, settings)
    request = _request()
    try:
        await runtime.handle_requested(request)  # retried in place, then given up: acknowledged
        await runtime.handle_requested(request)  # a late redelivery changes nothing
        assert plugin.calls == 3
        run = await db_pool.fetchrow(
            f"SELECT status, plan_attempts, errors FROM {schema}.runs WHERE job_id = $1",
            request.job_id,
        )
        assert run["status"] == "failed" and run["plan_attempts"] == 3
        assert run["errors"][0]["message"] == (
            "planning failed after 3 attempts: the source listing is corrupt"
        )
        assert await _outbox_topics(db_pool, schema) == [
            topics.failed(Stage.sorting),
            topics.dlq(Stage.sorting),
        ]
        row = await db_pool.fetchrow(
            f"SELECT key, envelope FROM {schema}.outbox WHERE topic = $1",
            topics.dlq(Stage.sorting),
        )
        letter = Envelope.model_validate(row["envelope"]).open(DeadLetter)
        assert row["key"] == str(request.job_id) and letter.attempts == 3
        assert letter.error == "RuntimeError: the source listing is corrupt"
        # the gateway keeps it as a replayable `plan` letter (GET /api/dead-letters, ADR 0022)
        assert letter_kind(letter, Stage.sorting) == "plan"
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_plan_stored_while_the_database_is_away_is_retried_without_limit(
    db_pool: asyncpg.Pool, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage_module, "backoff_s", lambda attempts: 0.0)
    settings = stack_settings.model_copy(update={"item_max_attempts": 2})
    runtime, schema = await _runtime(db_pool, settings, ["a", "b"])
    store = runtime._store_plan

    async def unreachable(*args: Any) -> None:
        raise ConnectionRefusedError("Postgres is restarting")

    request = _request()
    try:
        monkeypatch.setattr(runtime, "_store_plan", unreachable)
        for _ in range(4):  # twice the attempts: none of them counts
            with pytest.raises(ConnectionRefusedError):
                await runtime.handle_requested(request)
        run = await db_pool.fetchrow(f"SELECT status, plan_attempts FROM {schema}.runs")
        assert tuple(run) == ("planning", 0)
        monkeypatch.setattr(runtime, "_store_plan", store)  # the database is back
        await runtime.handle_requested(request)
        run = await db_pool.fetchrow(f"SELECT status, items_total FROM {schema}.runs")
        assert tuple(run) == ("running", 2)
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_closing_hand_over_does_not_wait_for_an_item_being_ended(
    db_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    """A streamed run's closing `StudiesPassed` plans the items already planned again (they are
    left out by key) while one of them may be ending. The item's end updates its row, then locks
    the run row; the append locks the run row, then adds the new keys: were the known keys left
    out by the insert's conflict check, it would wait for the item's transaction, which waits for
    the run row: a deadlock, which Postgres breaks by failing one of them (ADR 0023)."""
    runtime, schema = await _runtime(db_pool, stack_settings, ["a", "b"])
    cohort = CohortRef(id=uuid.uuid4(), name="probe", source_path="/nowhere")
    job_id = uuid.uuid4()

    def passed(closed: bool) -> Envelope:
        payload = StudiesPassed(
            stage=Stage.sorting, cohort=cohort, study_instance_uids=["1.2.3"], closed=closed
        )
        return Envelope.wrap(payload, source="test", cohort_id=cohort.id, job_id=job_id)

    opening = StageRequested(stage=Stage.sorting, cohort=cohort, streamed=True, upstream_open=True)
    ending = await db_pool.acquire()
    try:
        await runtime.handle_requested(
            Envelope.wrap(opening, source="test", cohort_id=cohort.id, job_id=job_id)
        )
        await runtime.handle_passed(passed(closed=False))  # items a and b, the run still open
        async with ending.transaction():
            # item a's end, as `_end_item` writes it: its row first, the run row next
            await ending.execute(
                f"UPDATE {schema}.run_items SET status = 'done' WHERE job_id = $1"
                " AND item_key = 'a'",
                job_id,
            )
            closing = asyncio.create_task(runtime.handle_passed(passed(closed=True)))
            await asyncio.wait({closing}, timeout=5)
            assert closing.done(), "the closing hand-over waits for item a's end"
            await closing  # raises what it met (a DeadlockDetectedError before the fix)
            await ending.fetchrow(
                f"SELECT status FROM {schema}.runs WHERE job_id = $1 FOR UPDATE", job_id
            )
        run = await db_pool.fetchrow(
            f"SELECT status, upstream_open, items_total FROM {schema}.runs WHERE job_id = $1",
            job_id,
        )
        assert tuple(run) == ("running", False, 2)  # closed, nothing planned twice
    finally:
        await db_pool.release(ending)
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class SlowPlugin(ListPlugin):
    """Each item takes `seconds`, or never ends while `hang` is set."""

    seconds: float = 0.0
    hang: bool = False

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(self.seconds)
        return ItemResult(counts={"processed": 1})


async def _planned(runtime: StageRuntime, schema: str, db_pool: asyncpg.Pool) -> list[Envelope]:
    """Plan a run; returns its WorkItem envelopes, as the items topic would deliver them."""
    await runtime.handle_requested(_request())
    rows = await db_pool.fetch(
        f"SELECT envelope FROM {schema}.outbox WHERE topic = $1 ORDER BY seq",
        topics.items(Stage.sorting),
    )
    return [Envelope.model_validate(r["envelope"]) for r in rows]


async def test_a_long_item_sends_heartbeats_while_it_runs(
    db_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    settings = stack_settings.model_copy(update={"heartbeat_interval_s": 0.3})
    schema = f"rt_{uuid.uuid4().hex[:10]}"
    await migrate_stage_schema(db_pool, schema, None)
    runtime = StageRuntime(SlowPlugin(schema, ["long"], seconds=2.0), db_pool, settings)
    try:
        [item] = await _planned(runtime, schema, db_pool)
        await runtime.handle_item(item)  # one item of 2 s: no progress event in between
        beats = await db_pool.fetch(
            f"SELECT envelope FROM {schema}.outbox WHERE envelope->>'type' = 'JobHeartbeat'"
        )
        assert len(beats) >= 4, len(beats)
        assert all(b["envelope"]["payload"]["job_ids"] == [str(item.job_id)] for b in beats)
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_an_item_whose_worker_vanished_is_taken_up_again(
    db_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    """No lease to expire: an item is `pending` until its end is committed, and its message is
    committed only after that, so the redelivery that follows a dead worker finds it pending."""
    schema = f"rt_{uuid.uuid4().hex[:10]}"
    await migrate_stage_schema(db_pool, schema, None)
    plugin = SlowPlugin(schema, ["a", "b"], hang=True)
    runtime = StageRuntime(plugin, db_pool, stack_settings)
    try:
        first, second = await _planned(runtime, schema, db_pool)
        working = asyncio.create_task(runtime.handle_item(first))
        await asyncio.sleep(0.5)
        working.cancel()  # the worker is gone mid-item: nothing of it was committed
        with pytest.raises(asyncio.CancelledError):
            await working
        item = await db_pool.fetchrow(
            f"SELECT status, attempts FROM {schema}.run_items WHERE item_key = 'a'"
        )
        assert (item["status"], item["attempts"]) == ("pending", 1)

        plugin.hang = False  # a new worker (the restarted service) gets both messages again
        for envelope in (first, second, first):  # and a late duplicate changes nothing
            await runtime.handle_item(envelope)
        items = await db_pool.fetch(
            f"SELECT item_key, status, attempts FROM {schema}.run_items ORDER BY item_key"
        )
        assert [tuple(r) for r in items] == [("a", "done", 2), ("b", "done", 1)]
        run = await db_pool.fetchrow(f"SELECT items_done, items_failed FROM {schema}.runs")
        assert tuple(run) == (2, 0)
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class HangingPlan(ListPlugin):
    """Planning never ends (the service is killed in the middle of it, every time)."""

    async def plan(
        self, pool: asyncpg.Pool, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        await asyncio.Event().wait()
        return []


async def test_a_request_whose_planning_never_finishes_fails_after_the_attempts(
    db_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    settings = stack_settings.model_copy(update={"item_max_attempts": 2})
    schema = f"rt_{uuid.uuid4().hex[:10]}"
    await migrate_stage_schema(db_pool, schema, None)
    runtime = StageRuntime(HangingPlan(schema, []), db_pool, settings)
    request = _request()
    try:
        for _ in range(2):  # the service dies while planning: nothing acknowledged
            planning = asyncio.create_task(runtime.handle_requested(request))
            await asyncio.sleep(0.3)
            planning.cancel()
            with pytest.raises(asyncio.CancelledError):
                await planning
        await runtime.handle_requested(request)  # the next delivery gives up at once
        run = await db_pool.fetchrow(f"SELECT status, errors FROM {schema}.runs")
        assert run["status"] == "failed"
        assert (
            run["errors"][0]["message"] == "planning gave up after 2 attempts that did not finish"
        )
        assert await _outbox_topics(db_pool, schema) == [
            topics.failed(Stage.sorting),
            topics.dlq(Stage.sorting),
        ]
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_work_item_whose_payload_is_not_valid_is_failed_and_dead_lettered_once(
    db_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    """Not redelivered forever: its attempt is counted, its row failed with the reason, the dead
    letter written in the same transaction, and the run still ends when the other items do."""
    runtime, schema = await _runtime(db_pool, stack_settings, ["broken", "fine"])
    request = _request()
    try:
        await runtime.handle_requested(request)
        rows = await db_pool.fetch(
            f"SELECT envelope FROM {schema}.outbox WHERE topic = $1 ORDER BY seq",
            topics.items(Stage.sorting),
        )
        items = {
            e.payload["item_key"]: e for e in (Envelope.model_validate(r["envelope"]) for r in rows)
        }
        broken = items["broken"].model_copy(
            update={"payload": {**items["broken"].payload, "cohort": {"id": "not a uuid"}}}
        )
        await runtime.handle_item(broken)  # returns: acknowledged
        await runtime.handle_item(broken)  # a redelivery changes nothing
        await runtime.handle_item(items["fine"])
        await runtime.handle_item(items["broken"])  # the original finds its row ended
        item = await db_pool.fetchrow(
            f"SELECT status, attempts, error FROM {schema}.run_items WHERE item_key = 'broken'"
        )
        assert (item["status"], item["attempts"]) == ("failed", 1)
        assert item["error"].startswith("not a valid WorkItem")
        run = await db_pool.fetchrow(
            f"SELECT items_done, items_failed FROM {schema}.runs WHERE job_id = $1",
            request.job_id,
        )
        assert (run["items_done"], run["items_failed"]) == (1, 1)
        sent = await _outbox_topics(db_pool, schema)
        assert sent.count(topics.dlq(Stage.sorting)) == 1
        assert sent[-1] == topics.items(Stage.sorting), "the finalize item: the run ends"
    finally:
        await runtime.stop_heartbeats()
        await db_pool.execute(f"DROP SCHEMA {schema} CASCADE")
