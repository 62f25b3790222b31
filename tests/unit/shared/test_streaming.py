"""Studies streamed through the stages of a pipeline run (ADR 0023), in milliseconds: three stage
runtimes, each with its own tables in memory (`FakeDatabase`), and a broker that delivers what
their outboxes hold, in order per topic, in the order a test chooses. The real stack runs the same
in tests/integration/test_stage_runtime.py."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import SecretStr

from shared import topics
from shared.events import (
    CohortRef,
    Envelope,
    JobControl,
    JobProgress,
    SlipStep,
    StageCompleted,
    StageFailed,
    StageRequested,
    StudiesPassed,
    WorkItem,
)
from shared.settings import Settings
from shared.stage import FINALIZE_KEY, ItemContext, ItemResult, PlannedItem, RunInfo, StageRuntime
from shared.topics import Stage
from tests.unit.shared.fake_database import FakeDatabase

COHORT = CohortRef(id=uuid.uuid4(), name="c1", source_path="/data/c1")
STUDIES = ["s1", "s2", "s3"]


class Stage1:
    """Hands on every study it ends done, like the anonymizer; `fail` studies fail."""

    stage = Stage.anonymization
    service = "anonymizer"
    schema = "anonymizer"

    def __init__(self, world: World) -> None:
        self.world = world
        self.fail: set[str] = set()
        self.plan_error: Exception | None = None

    async def plan(
        self, pool: Any, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        if self.plan_error is not None:
            raise self.plan_error
        return [PlannedItem(key=s) for s in STUDIES]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        self.world.log.append((self.stage, item.item_key))
        if item.item_key in self.fail:
            raise RuntimeError("unreadable study")
        self.world.out[self.stage].add(item.item_key)
        return ItemResult(counts={"studies": 1}, studies=[f"new-{item.item_key}"])

    async def finalize(self, pool: Any, run: RunInfo) -> tuple[dict[str, Any], str | None]:
        self.world.finalized.append(self.stage)
        return {}, "anon/c1"

    def cohort_prefixes(self, cohort_id: uuid.UUID) -> list[str]:
        return []


class Stage2(Stage1):
    """Plans the studies of its scope the stage before has output (all of them unscoped), one
    item each, and hands each on, like sorting."""

    stage = Stage.extraction
    service = "extractor"
    schema = "catalog"

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.plans: list[list[str]] = []

    async def plan(
        self, pool: Any, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        self.plans.append(request.study_instance_uids)
        have = sorted(f"new-{s}" for s in self.world.out[Stage.anonymization])
        wanted = request.study_instance_uids or have
        return [PlannedItem(key=s) for s in have if s in wanted]

    async def process(self, ctx: ItemContext, item: WorkItem) -> ItemResult:
        self.world.log.append((self.stage, item.item_key))
        return ItemResult(counts={"studies": 1}, studies=[item.item_key])


class Stage3(Stage2):
    """Cohort-wide work (the exporter's naming): plans once the stage before has closed."""

    stage = Stage.export
    service = "exporter"
    schema = "export"
    streams_in = False

    async def plan(
        self, pool: Any, request: StageRequested, job_id: uuid.UUID
    ) -> list[PlannedItem]:
        self.plans.append(request.study_instance_uids)
        return [PlannedItem(key="tree")]


class World:
    """Three stage services and the broker between them."""

    def __init__(self, **cfg: Any) -> None:
        self.log: list[tuple[Stage, str]] = []
        self.out: dict[Stage, set[str]] = {s: set() for s in Stage}
        self.finalized: list[Stage] = []
        settings = Settings(
            item_max_attempts=2,
            progress_interval_s=0.0,
            project_secret=SecretStr("unit-test-secret"),
            **cfg,
        )
        self.plugins: dict[Stage, Any] = {}
        self.dbs: dict[Stage, FakeDatabase] = {}
        self.runtimes: dict[Stage, StageRuntime] = {}
        for plugin in (Stage1(self), Stage2(self), Stage3(self)):
            self.plugins[plugin.stage] = plugin
            self.dbs[plugin.stage] = db = FakeDatabase(plugin.schema)
            self.runtimes[plugin.stage] = StageRuntime(plugin, db.pool(), settings)
        self.read = {s: 0 for s in Stage}  # outbox rows taken by the broker, per service
        self.queue: list[tuple[str, Envelope]] = []  # published, not delivered yet
        self.jobs = {s: uuid.uuid4() for s in Stage}

    def start(self, slip: bool = True) -> Envelope:
        steps = [SlipStep(stage=s, job_id=self.jobs[s]) for s in (Stage.extraction, Stage.export)]
        request = StageRequested(
            stage=Stage.anonymization, cohort=COHORT, slip=steps if slip else []
        )
        return Envelope.wrap(
            request,
            source="gateway",
            cohort_id=COHORT.id,
            job_id=self.jobs[Stage.anonymization],
            correlation_id=uuid.uuid4(),
        )

    def publish(self) -> None:
        """Every service's relay sends its new outbox rows."""
        for stage, db in self.dbs.items():
            for topic, _, env in db.outbox[self.read[stage] :]:
                self.queue.append((topic, env))
            self.read[stage] = len(db.outbox)

    async def deliver(self, topic: str, env: Envelope) -> None:
        for stage, runtime in self.runtimes.items():
            if topic == topics.requested(stage):
                await runtime.handle_requested(env)
            elif topic == topics.items(stage):
                await runtime.handle_item(env)
            elif topic == topics.JOBS_CONTROL:
                await runtime.handle_control(env)

    async def step(self, topic: str, key: str | None = None) -> Envelope:
        """Deliver the first queued message of `topic` (a work item of `key`, when given)."""
        self.publish()
        for i, (t, env) in enumerate(self.queue):
            if t == topic and (key is None or env.payload.get("item_key") == key):
                del self.queue[i]
                await self.deliver(t, env)
                self.publish()
                return env
        raise AssertionError(f"nothing queued on {topic} {key or ''}: {self.queue}")

    async def drain(self, *only: str) -> None:
        """Deliver everything queued (of these topics), in order, until nothing is left."""
        self.publish()
        while True:
            ready = [(t, e) for t, e in self.queue if not only or t in only]
            if not ready:
                return
            await self.step(ready[0][0], ready[0][1].payload.get("item_key"))

    def run(self, stage: Stage) -> dict[str, Any]:
        return self.dbs[stage].runs[self.jobs[stage]]

    def events(self, stage: Stage, topic: str) -> list[Envelope]:
        return self.dbs[stage].events(topic)


REQUESTED = [topics.requested(s) for s in Stage]


async def test_a_study_starts_its_next_stage_while_others_are_still_in_this_one() -> None:
    w = World(stream_stages=True)
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    await w.drain(*REQUESTED)
    # every job of the run exists from the start; the later ones are open, waiting for studies
    for stage in (Stage.extraction, Stage.export):
        assert (w.run(stage)["status"], w.run(stage)["upstream_open"]) == ("running", True)
        progress = w.events(stage, topics.JOBS_PROGRESS)[-1].open(JobProgress)
        assert (progress.status, progress.upstream_open, progress.items_total) == (
            "running",
            True,
            0,
        )

    await w.step(topics.items(Stage.anonymization), "s1")
    await w.drain(*REQUESTED)  # s1 passed: extraction plans it alone
    assert w.plugins[Stage.extraction].plans == [["new-s1"]]
    await w.step(topics.items(Stage.extraction), "new-s1")
    assert w.log == [(Stage.anonymization, "s1"), (Stage.extraction, "new-s1")]
    assert w.run(Stage.anonymization)["status"] == "running", "s2 and s3 are still in it"
    assert w.plugins[Stage.export].plans == [], "export waits for extraction to close"

    await w.drain()
    for stage in Stage.anonymization, Stage.extraction, Stage.export:
        (done_env,) = w.events(stage, topics.completed(stage))
        assert done_env.job_id == w.jobs[stage]
    ext = w.events(Stage.extraction, topics.completed(Stage.extraction))[0].open(StageCompleted)
    assert (ext.items_total, ext.items_done, ext.items_failed) == (3, 3, 0)
    assert ext.summary == {"studies": 3}
    # the close planned nothing twice; export planned once, for the whole scope
    assert w.plugins[Stage.extraction].plans == [["new-s1"], ["new-s2"], ["new-s3"], []]
    assert w.plugins[Stage.export].plans == [[]]
    assert w.finalized == [Stage.anonymization, Stage.extraction, Stage.export]
    assert sorted(k for s, k in w.log if s is Stage.extraction) == ["new-s1", "new-s2", "new-s3"]
    # nothing went to a requested topic as a StageRequested past the first stage's own
    for stage in Stage.anonymization, Stage.extraction:
        sent = w.events(stage, topics.requested(Stage(w.run(stage)["request"]["slip"][0]["stage"])))
        assert sent[0].type == "StageRequested"  # the open run
        assert {e.type for e in sent[1:]} == {"StudiesPassed"}
        assert sent[-1].open(StudiesPassed).closed
    # the close carries what the slip's request would: the output prefix of the stage's finalize
    close = w.events(Stage.anonymization, topics.requested(Stage.extraction))[-1]
    assert close.open(StudiesPassed).input_prefix == "anon/c1"


async def test_the_last_item_before_the_close_waits_for_it_and_the_close_finalizes() -> None:
    w = World(stream_stages=True)
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    for study in STUDIES:
        await w.step(topics.items(Stage.anonymization), study)
    await w.drain(*REQUESTED, topics.items(Stage.extraction))
    # every extraction item ended, but anonymization has not closed it yet: no finalize
    run = w.run(Stage.extraction)
    assert (run["items_done"], run["items_total"], run["upstream_open"]) == (3, 3, True)
    assert Stage.extraction not in w.finalized
    await w.drain()
    assert w.finalized == [Stage.anonymization, Stage.extraction, Stage.export]
    assert w.run(Stage.extraction)["status"] == "completed"


async def test_a_study_that_fails_upstream_never_passes_and_the_downstream_still_ends() -> None:
    w = World(stream_stages=True)
    w.plugins[Stage.anonymization].fail = {"s2"}
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    await w.drain()
    assert sorted(k for s, k in w.log if s is Stage.extraction) == ["new-s1", "new-s3"]
    anon = w.events(Stage.anonymization, topics.completed(Stage.anonymization))[0]
    assert anon.open(StageCompleted).items_failed == 1
    ext = w.events(Stage.extraction, topics.completed(Stage.extraction))[0].open(StageCompleted)
    assert (ext.items_total, ext.items_done) == (2, 2)
    assert w.run(Stage.export)["status"] == "completed"


async def test_a_failed_upstream_run_ends_the_open_runs_after_it() -> None:
    w = World(stream_stages=True)
    w.plugins[Stage.anonymization].fail = set(STUDIES)
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    await w.drain()
    failed = w.events(Stage.anonymization, topics.failed(Stage.anonymization))
    assert failed[0].open(StageFailed).error == "every item failed"
    for stage in (Stage.extraction, Stage.export):
        assert w.run(stage)["status"] == "cancelled"
        assert "anonymization failed" in w.run(stage)["errors"][-1]["message"]
        assert w.plugins[stage].plans == []


async def test_a_cancelled_open_run_takes_no_studies() -> None:
    w = World(stream_stages=True)
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    await w.drain(*REQUESTED)
    control = Envelope.wrap(
        JobControl(action="cancel"), source="gateway", job_id=w.jobs[Stage.extraction]
    )
    await w.deliver(topics.JOBS_CONTROL, control)
    await w.drain()
    assert w.run(Stage.extraction)["status"] == "cancelled"
    assert w.plugins[Stage.extraction].plans == []
    assert not w.events(Stage.extraction, topics.completed(Stage.extraction))


async def test_redelivered_studies_and_close_plan_nothing_twice() -> None:
    w = World(stream_stages=True)
    await w.deliver(topics.requested(Stage.anonymization), w.start())
    await w.drain(*REQUESTED, topics.items(Stage.anonymization))
    passed = w.events(Stage.anonymization, topics.requested(Stage.extraction))
    for env in passed:  # the broker delivers every hand-over and the close twice
        await w.deliver(topics.requested(Stage.extraction), env)
    await w.drain()
    run = w.run(Stage.extraction)
    assert (run["items_total"], run["items_done"], run["status"]) == (3, 3, "completed")
    assert w.finalized.count(Stage.extraction) == 1
    items = w.events(Stage.extraction, topics.items(Stage.extraction))
    assert sum(e.payload["item_key"] == FINALIZE_KEY for e in items) == 1


async def test_without_a_slip_or_with_streaming_off_a_stage_runs_as_before() -> None:
    for w, slip in ((World(stream_stages=True), False), (World(stream_stages=False), True)):
        await w.deliver(topics.requested(Stage.anonymization), w.start(slip=slip))
        await w.drain(topics.requested(Stage.anonymization))
        assert Stage.extraction not in {s for s, db in w.dbs.items() if db.runs}
        await w.drain()
        if slip:  # the next stage got its whole request at the end, as before
            (nxt,) = w.events(Stage.anonymization, topics.requested(Stage.extraction))
            assert nxt.type == "StageRequested"
            assert w.plugins[Stage.extraction].plans == [[]]
            assert w.run(Stage.export)["status"] == "completed"
        assert not any(e.type == "StudiesPassed" for db in w.dbs.values() for e in db.events())
