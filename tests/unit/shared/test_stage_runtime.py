"""The stage runtime's event discipline, in milliseconds: a fake plugin, the runtime's tables in
memory (`FakeDatabase`), and a loop that delivers what the outbox holds back to the runtime, the
way the broker would. The same runtime runs against Postgres in tests/integration."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from shared import topics
from shared.events import (
    CohortRef,
    DeadLetter,
    Envelope,
    JobControl,
    SlipStep,
    StageCompleted,
    StageFailed,
    StageRequested,
    WorkItem,
)
from shared.retry import backoff_s
from shared.secrets import is_sealed
from shared.settings import Settings
from shared.stage import (
    FINALIZE_KEY,
    ItemContext,
    ItemResult,
    PlannedItem,
    RunInfo,
    StageRuntime,
    next_request,
)
from shared.topics import Stage
from tests.unit.shared.fake_database import FakeDatabase

STAGE = Stage.extraction
COHORT = CohortRef(id=uuid.uuid4(), name="c1", source_path="/data/c1")


class Plugin:
    """A stage whose items count files; `failures[key]` makes an item raise that many times
    (an exception instance, raised as is), `cancel_inside` checks for a cancel mid-item."""

    stage = STAGE
    service = "extractor"
    schema = "extractor"

    def __init__(self, keys: list[str], failures: dict[str, list[BaseException]] | None = None):
        self.keys = keys
        self.failures = failures or {}
        self.processed: list[str] = []
        self.finalized: list[RunInfo] = []
        self.plan_error: Exception | None = None
        self.cancel_inside = False

    async def plan(
        self, pool: Any, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        if self.plan_error is not None:
            raise self.plan_error
        return [PlannedItem(key=k, data={"n": i}) for i, k in enumerate(self.keys)]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        self.processed.append(item.item_key)
        if self.cancel_inside:
            await ctx.check_cancelled()
        pending = self.failures.get(item.item_key)
        if pending:
            raise pending.pop(0)
        return ItemResult(counts={"files": 2})

    async def finalize(self, pool: Any, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        self.finalized.append(run)
        return {"finalized": True}, f"out/{run.job_id}/"

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        return []


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "item_max_attempts": 3,
        "progress_interval_s": 0.0,
        "project_secret": "unit-test-secret",
        # one stage at a time, its slip's next request at its end (test_streaming.py: streamed)
        "stream_stages": False,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The runtime's pause between in-process retries, recorded instead of slept."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> Any:
        if seconds > backoff_s(99):  # not a retry's pause: the heartbeat's interval sleeps on
            return await real_sleep(seconds, *args)
        waits.append(seconds)
        return await real_sleep(0)

    monkeypatch.setattr("shared.stage.asyncio.sleep", sleep)
    return waits


class Harness:
    """The runtime, its fake tables, and a broker that delivers the outbox in order."""

    def __init__(self, plugin: Plugin, cfg: Settings | None = None) -> None:
        self.plugin = plugin
        self.db = FakeDatabase(plugin.schema)
        self.runtime = StageRuntime(plugin, self.db.pool(), cfg or settings())
        self.delivered = 0

    def request(self, slip: list[SlipStep] | None = None, **fields: Any) -> Envelope:
        payload = StageRequested(stage=STAGE, cohort=COHORT, slip=slip or [], **fields)
        return Envelope.wrap(
            payload,
            source="gateway",
            cohort_id=COHORT.id,
            job_id=uuid.uuid4(),
            correlation_id=uuid.uuid4(),  # the gateway's pipeline run
        )

    async def deliver(self, envelope: Envelope) -> None:
        handlers = {
            topics.requested(STAGE): self.runtime.handle_requested,
            topics.items(STAGE): self.runtime.handle_item,
            topics.JOBS_CONTROL: self.runtime.handle_control,
        }
        topic = {
            "StageRequested": topics.requested(STAGE),
            "WorkItem": topics.items(STAGE),
            "JobControl": topics.JOBS_CONTROL,
        }[envelope.type]
        await handlers[topic](envelope)

    async def drain(self) -> None:
        """Deliver every item the outbox holds (new ones too) to the runtime, in order."""
        while self.delivered < len(self.db.outbox):
            topic, _, envelope = self.db.outbox[self.delivered]
            self.delivered += 1
            if topic == topics.items(STAGE):
                await self.deliver(envelope)

    def one(self, topic: str) -> Envelope:
        (envelope,) = self.db.events(topic)
        return envelope

    def item_envelopes(self) -> list[Envelope]:
        return [
            e for e in self.db.events(topics.items(STAGE)) if e.payload["item_key"] != FINALIZE_KEY
        ]


async def test_a_run_fans_out_fans_in_and_requests_the_next_stage() -> None:
    h = Harness(Plugin(["s1", "s2", "s3"]))
    sorting = SlipStep(stage=Stage.sorting, job_id=uuid.uuid4(), config={"profile": "x"})
    export = SlipStep(stage=Stage.export, job_id=uuid.uuid4())
    request = h.request(slip=[sorting, export])
    await h.deliver(request)
    assert [e.payload["item_key"] for e in h.item_envelopes()] == ["s1", "s2", "s3"]
    assert h.plugin.processed == []  # planning publishes; it does not process

    await h.drain()
    assert sorted(h.plugin.processed) == ["s1", "s2", "s3"]
    assert len(h.plugin.finalized) == 1, "finalize runs once, after the last item"
    done = h.one(topics.completed(STAGE)).open(StageCompleted)
    assert (done.items_total, done.items_done, done.items_failed) == (3, 3, 0)
    assert done.summary == {"files": 6, "finalized": True}
    assert done.slip == [sorting, export]

    nxt_env = h.one(topics.requested(Stage.sorting))
    nxt = nxt_env.open(StageRequested)
    assert nxt_env.job_id == sorting.job_id
    assert (nxt.stage, nxt.config, nxt.slip) == (Stage.sorting, {"profile": "x"}, [export])
    assert nxt.input_prefix == f"out/{request.job_id}/"
    assert h.db.runs[request.job_id]["status"] == "completed"
    # items, progress, completion and the next request all belong to the one pipeline run
    assert {e.correlation_id for e in h.db.events()} == {request.correlation_id}


async def test_progress_is_throttled_between_the_plan_and_the_last_item() -> None:
    h = Harness(Plugin(["s1", "s2", "s3", "s4"]), settings(progress_interval_s=3600.0))
    await h.deliver(h.request())
    await h.drain()
    progress = [e.payload for e in h.db.events(topics.JOBS_PROGRESS)]
    # the plan's (forced), the first item's (none went out by the throttle yet), none for the
    # items in between (not due), the last item's (forced), and the run's end
    assert [(p["items_done"], p["status"]) for p in progress] == [
        (0, "running"),
        (1, "running"),
        (4, "running"),
        (4, "completed"),
    ]


async def test_an_empty_plan_still_finalizes_and_completes() -> None:
    h = Harness(Plugin([]))
    await h.deliver(h.request())
    await h.drain()
    assert len(h.plugin.finalized) == 1
    assert h.one(topics.completed(STAGE)).open(StageCompleted).items_total == 0


async def test_redelivered_request_and_items_do_the_work_once() -> None:
    h = Harness(Plugin(["s1", "s2"]))
    request = h.request()
    await h.deliver(request)
    await h.deliver(request)
    assert len(h.item_envelopes()) == 2, "a redelivered request does not plan again"
    first = h.item_envelopes()[0]
    await h.deliver(first)
    await h.deliver(first)
    assert h.plugin.processed == ["s1"]
    await h.drain()
    assert h.db.runs[request.job_id]["items_done"] == 2
    assert len(h.db.events(topics.completed(STAGE))) == 1


async def test_an_item_that_fails_once_is_retried_and_counts_its_attempts(
    no_backoff: list[float],
) -> None:
    h = Harness(Plugin(["s1"], failures={"s1": [RuntimeError("flaky")]}))
    request = h.request()
    await h.deliver(request)
    await h.drain()
    assert h.plugin.processed == ["s1", "s1"]
    assert h.db.items[(request.job_id, "s1")]["attempts"] == 2
    assert h.db.items[(request.job_id, "s1")]["status"] == "done"
    assert no_backoff == [2.0]  # backs off before the second attempt
    assert h.db.events(topics.dlq(STAGE)) == []


async def test_an_item_that_keeps_failing_is_dead_lettered_and_the_run_goes_on(
    no_backoff: list[float],
) -> None:
    boom: list[BaseException] = [RuntimeError("boom") for _ in range(5)]
    h = Harness(Plugin(["bad", "good"], failures={"bad": boom}), settings(item_max_attempts=3))
    request = h.request()
    await h.deliver(request)
    await h.drain()
    assert h.plugin.processed.count("bad") == 3
    letter_env = h.one(topics.dlq(STAGE))
    letter = letter_env.open(DeadLetter)
    assert letter.topic == topics.items(STAGE) and letter.attempts == 3
    assert letter.error == "RuntimeError: boom"
    assert letter.original["item_key"] == "bad"
    assert letter_env.job_id == request.job_id
    done = h.one(topics.completed(STAGE)).open(StageCompleted)
    assert (done.items_done, done.items_failed) == (1, 1)
    assert [(e.item, e.message) for e in done.errors] == [("bad", "RuntimeError: boom")]


async def test_attempts_count_before_work_so_an_item_that_kills_its_worker_ends() -> None:
    """A worker killed mid-item never records a failure; the attempt it used is counted anyway,
    and the redelivery after the last allowed attempt dead-letters without processing."""
    killed: list[BaseException] = [asyncio.CancelledError() for _ in range(5)]
    h = Harness(Plugin(["poison"], failures={"poison": killed}), settings(item_max_attempts=2))
    request = h.request()
    await h.deliver(request)
    (item,) = h.item_envelopes()
    for _ in range(2):
        with pytest.raises(asyncio.CancelledError):
            await h.deliver(item)  # the worker dies; the broker redelivers
    assert h.db.items[(request.job_id, "poison")]["attempts"] == 2
    await h.deliver(item)
    assert h.plugin.processed == ["poison", "poison"], "the third delivery does not process"
    letter = h.one(topics.dlq(STAGE)).open(DeadLetter)
    assert letter.error == "gave up after 2 attempts"
    await h.drain()
    failed = h.one(topics.failed(STAGE)).open(StageFailed)
    assert failed.error == "every item failed" and failed.items_failed == 1
    assert h.db.events(topics.completed(STAGE)) == []


async def test_a_cancelled_run_stops_between_items_and_requests_nothing_more() -> None:
    h = Harness(Plugin(["s1", "s2", "s3"]), settings())
    sorting = SlipStep(stage=Stage.sorting, job_id=uuid.uuid4())
    request = h.request(slip=[sorting])
    await h.deliver(request)
    first, *rest = h.item_envelopes()
    await h.deliver(first)
    cancel = Envelope.wrap(JobControl(action="cancel"), source="gateway", job_id=request.job_id)
    await h.deliver(cancel)
    for envelope in rest:
        await h.deliver(envelope)
    await h.drain()
    assert h.plugin.processed == ["s1"]
    assert h.db.runs[request.job_id]["status"] == "cancelled"
    assert h.plugin.finalized == []
    assert h.db.events(topics.completed(STAGE)) == []
    assert h.db.events(topics.requested(Stage.sorting)) == []


async def test_a_cancel_in_the_gateways_view_is_seen_inside_an_item() -> None:
    plugin = Plugin(["s1"])
    plugin.cancel_inside = True
    h = Harness(plugin)
    request = h.request()
    await h.deliver(request)
    assert h.db.gateway_cancelled is not None
    h.db.gateway_cancelled.add(request.job_id)  # cancelled at the gateway, no event seen here
    h.runtime._cancelled.clear()
    await h.drain()
    assert h.db.items[(request.job_id, "s1")]["status"] == "cancelled"
    assert h.db.runs[request.job_id]["status"] == "cancelled"
    assert h.plugin.finalized == []


async def test_a_request_for_a_cancelled_job_is_recorded_and_not_planned() -> None:
    h = Harness(Plugin(["s1"]))
    request = h.request()
    assert request.job_id is not None and h.db.gateway_cancelled is not None
    h.db.gateway_cancelled.add(request.job_id)
    await h.deliver(request)
    assert h.db.runs[request.job_id]["status"] == "cancelled"
    assert h.db.events(topics.items(STAGE)) == []


class FlakyPlan(Plugin):
    """`plan` raises each of `plan_errors` in turn, then plans."""

    def __init__(self, keys: list[str], plan_errors: list[Exception]) -> None:
        super().__init__(keys)
        self.plan_errors = plan_errors
        self.plan_calls = 0

    async def plan(
        self, pool: Any, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        self.plan_calls += 1
        if self.plan_errors:
            raise self.plan_errors.pop(0)
        return await super().plan(pool, request, job_id)


async def test_planning_that_raises_once_is_retried_and_counts_its_attempts(
    no_backoff: list[float],
) -> None:
    plugin = FlakyPlan(["s1"], [FileNotFoundError("source not mounted yet")])
    h = Harness(plugin)
    request = h.request()
    await h.deliver(request)
    run = h.db.runs[request.job_id]
    assert plugin.plan_calls == 2 and run["plan_attempts"] == 2
    assert run["status"] == "running" and len(h.item_envelopes()) == 1
    assert no_backoff == [2.0]  # backs off before the second attempt
    assert h.db.events(topics.dlq(STAGE)) == []


async def test_planning_that_keeps_raising_fails_the_run_and_dead_letters_the_request(
    no_backoff: list[float],
) -> None:
    errors: list[Exception] = [ValueError("source folder is gone") for _ in range(5)]
    plugin = FlakyPlan(["s1"], errors)
    h = Harness(plugin, settings(item_max_attempts=3))
    request = h.request()
    await h.deliver(request)
    assert plugin.plan_calls == 3 and h.db.runs[request.job_id]["plan_attempts"] == 3
    failed = h.one(topics.failed(STAGE)).open(StageFailed)
    assert failed.error == "planning failed after 3 attempts: source folder is gone"
    assert h.db.runs[request.job_id]["status"] == "failed"
    assert h.db.events(topics.items(STAGE)) == []
    letter_env = h.one(topics.dlq(STAGE))
    letter = letter_env.open(DeadLetter)
    # what the gateway keeps as a `plan` letter: the request's topic and its whole envelope
    assert letter.topic == topics.requested(STAGE) and letter.attempts == 3
    assert letter.error == "ValueError: source folder is gone"
    assert letter.original["id"] == str(request.id)
    assert letter_env.job_id == request.job_id
    assert [k for t, k, _ in h.db.outbox if t == topics.dlq(STAGE)] == [str(request.job_id)]
    await h.deliver(request)  # a late redelivery changes nothing
    assert plugin.plan_calls == 3 and len(h.db.events(topics.dlq(STAGE))) == 1


async def test_planning_while_the_database_is_away_gives_the_attempt_back(
    no_backoff: list[float],
) -> None:
    plugin = FlakyPlan(["s1"], [ConnectionRefusedError("database away")])
    h = Harness(plugin)
    request = h.request()
    with pytest.raises(ConnectionRefusedError):  # nacked: the broker delivers it again
        await h.deliver(request)
    assert h.db.runs[request.job_id]["plan_attempts"] == 0
    await h.deliver(request)
    assert h.db.runs[request.job_id]["status"] == "running"
    assert h.db.events(topics.dlq(STAGE)) == []


async def test_a_scoped_run_keeps_its_study_uids_sealed_in_the_run_row() -> None:
    h = Harness(Plugin(["s1"]))
    request = h.request(study_instance_uids=["1.2.3.4"])
    await h.deliver(request)
    stored = h.db.runs[request.job_id]["request"]["study_instance_uids"]
    assert len(stored) == 1 and is_sealed(stored[0]) and "1.2.3.4" not in stored[0]
    await h.drain()
    assert h.plugin.finalized[0].request.study_instance_uids == ["1.2.3.4"]


async def test_items_of_another_stage_are_not_this_runtimes() -> None:
    h = Harness(Plugin(["s1"]))
    other = WorkItem(stage=Stage.sorting, cohort=COHORT, item_key="s1")
    await h.runtime.handle_item(Envelope.wrap(other, source="x", job_id=uuid.uuid4()))
    assert h.plugin.processed == [] and h.db.outbox == []


# --- pure parts -------------------------------------------------------------------------------


def _slip_request(stage: Stage, uids: list[str]) -> StageRequested:
    step = SlipStep(stage=Stage.sorting, job_id=uuid.uuid4(), config={"a": 1})
    return StageRequested(
        stage=stage,
        cohort=COHORT,
        slip=[step, SlipStep(stage=Stage.export, job_id=uuid.uuid4())],
        study_instance_uids=uids,
        input_prefix="raw/c1/",
        location="/incoming/study",
    )


def test_the_slip_passes_scope_location_and_the_output_prefix_on() -> None:
    request = _slip_request(Stage.extraction, ["1.2.3"])
    step, nxt = next_request(request, "catalog/c1/") or (None, None)
    assert step is request.slip[0] and nxt is not None
    assert nxt.slip == request.slip[1:] and nxt.config == {"a": 1}
    assert nxt.study_instance_uids == ["1.2.3"] and nxt.location == "/incoming/study"
    assert nxt.input_prefix == "catalog/c1/"
    _, kept = next_request(request, None) or (None, None)
    assert kept is not None and kept.input_prefix == "raw/c1/"


def test_a_stage_that_renames_studies_passes_the_new_scope_on() -> None:
    request = _slip_request(Stage.anonymization, ["1.2.3"])
    _, nxt = next_request(request, "anon/c1/", ["2.25.9"]) or (None, None)
    assert nxt is not None and nxt.study_instance_uids == ["2.25.9"]


def test_the_slip_ends_with_its_last_stage() -> None:
    request = StageRequested(stage=Stage.export, cohort=COHORT)
    assert next_request(request, "export/") is None


async def test_cancel_checks_inside_an_item_are_throttled() -> None:
    asked: list[bool] = []

    async def is_cancelled() -> bool:
        asked.append(True)
        return len(asked) >= 2

    ctx = ItemContext(None, settings(), uuid.uuid4(), is_cancelled, check_interval_s=3600)
    for _ in range(10):
        await ctx.check_cancelled()
    assert len(asked) == 1, "one question per interval, not one per file"
    ctx.check_interval_s = 0.0
    with pytest.raises(Exception, match=str(ctx.job_id)):
        await ctx.check_cancelled()


async def test_a_work_item_whose_payload_is_not_valid_is_counted_failed_and_dead_lettered() -> None:
    """A valid envelope around a payload that is not a WorkItem: its attempt is counted, the item
    fails with the reason and goes to the dead-letter topic at once (never redelivered forever),
    and the run still ends."""
    h = Harness(Plugin(["bad", "good"]))
    request = h.request()
    await h.deliver(request)
    bad = next(e for e in h.item_envelopes() if e.payload["item_key"] == "bad")
    broken = bad.model_copy(update={"payload": {**bad.payload, "cohort": "not a cohort"}})
    await h.deliver(broken)  # returns: nothing raised for the broker to redeliver
    row = h.db.items[(request.job_id, "bad")]
    assert (row["attempts"], row["status"]) == (1, "failed")
    assert "not a valid WorkItem" in row["error"]
    letter_env = h.one(topics.dlq(STAGE))
    letter = letter_env.open(DeadLetter)
    assert letter.topic == topics.items(STAGE) and letter.attempts == 1
    assert letter.original["item_key"] == "bad"
    assert letter_env.job_id == request.job_id
    assert letter_env.correlation_id == request.correlation_id
    await h.deliver(broken)  # a redelivery changes nothing
    assert len(h.db.events(topics.dlq(STAGE))) == 1
    await h.drain()  # the good item; the original bad envelope finds its row ended
    assert h.plugin.processed == ["good"]
    done = h.one(topics.completed(STAGE)).open(StageCompleted)
    assert (done.items_done, done.items_failed) == (1, 1)


async def test_an_unreadable_work_item_without_a_row_is_dead_lettered_alone() -> None:
    h = Harness(Plugin([]))
    envelope = Envelope(
        type="WorkItem", source="sorter", job_id=uuid.uuid4(), payload={"stage": STAGE.value}
    )
    await h.deliver(envelope)
    letter = h.one(topics.dlq(STAGE)).open(DeadLetter)
    assert letter.error.startswith("not a valid WorkItem") and letter.original == envelope.payload
