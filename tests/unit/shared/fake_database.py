"""The stage runtime's tables in memory: a fake asyncpg pool for fast tests of `shared.stage`.

It answers exactly the statements `StageRuntime` and `shared.outbox.enqueue_many` send to a stage's
schema (`runs`, `run_items`, `outbox`) and the gateway's `job_control_v`, with the semantics the
SQL has there (conditional updates, `RETURNING`, `ON CONFLICT DO NOTHING`). Any other statement
fails the test with the statement's text: a new query in the runtime needs its line here too,
and the integration tests check the real SQL against Postgres.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from shared.events import Envelope

Row = dict[str, Any]


class FakeDatabase:
    """One stage schema's runtime tables, plus the outbox as a list of sent-to-be events."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        # keyed by job id (tests index with an envelope's `job_id`, typed optional)
        self.runs: dict[uuid.UUID | None, Row] = {}
        self.items: dict[tuple[uuid.UUID | None, str], Row] = {}
        self.outbox: list[tuple[str, str | None, Envelope]] = []
        self.sent: set[int] = set()  # outbox positions the relay marked sent (seq = position + 1)
        # jobs the gateway's job_control_v says are cancelled (None: the view does not exist)
        self.gateway_cancelled: set[uuid.UUID | None] | None = set()
        statements: list[tuple[str, Callable[..., Any]]] = [
            (r"^SELECT status FROM {s}\.runs WHERE job_id", self._run_status),
            (r"^UPDATE {s}\.runs SET last_progress_at", self._progress_due),
            (r"^INSERT INTO {s}\.run_items \(job_id, item_key\) SELECT", self._append_items),
            (r"^INSERT INTO {s}\.run_items", self._insert_item),
            (r"^UPDATE {s}\.runs SET status = 'running', items_total", self._start_run),
            (r"^UPDATE {s}\.run_items SET attempts = attempts \+ 1", self._count_attempt),
            (r"^UPDATE {s}\.run_items i SET attempts = i\.attempts \+ 1", self._start_item),
            (r"^WITH ended AS \(UPDATE {s}\.run_items SET status = \$3", self._end_item_locked),
            (r"^UPDATE {s}\.runs SET items_done = items_done \+ \$2", self._count_item),
            (r"^SELECT \* FROM {s}\.runs WHERE job_id", self._run_row),
            (r"^UPDATE {s}\.runs SET status = \$2, summary = \$3", self._end_run),
            (r"^UPDATE {s}\.runs SET status = 'failed'", self._fail_run),
            (r"^UPDATE {s}\.runs SET status = 'cancelled', .* errors = errors", self._abandon_run),
            (r"^UPDATE {s}\.runs SET status = 'cancelled'", self._cancel_run),
            (r"^INSERT INTO {s}\.runs \(.*upstream_open\)", self._open_run),
            (r"^INSERT INTO {s}\.runs ", self._insert_run),
            (r"^UPDATE {s}\.runs SET items_total = items_total \+ \$2", self._grow_run),
            (r"^UPDATE {s}\.runs SET plan_attempts = plan_attempts \+ \$2", self._count_plan),
            (r"^SELECT job_id FROM {s}\.runs WHERE status IN", self._open_runs),
            (r"^INSERT INTO {s}\.outbox ", self._enqueue),
            (
                r"^SELECT seq, topic, key, envelope FROM {s}\.outbox WHERE sent_at IS NULL",
                self._unsent,
            ),
            (r"^UPDATE {s}\.outbox SET sent_at = now\(\)", self._mark_sent),
            (r"^SELECT to_regclass", self._relation_exists),
            (r"^SELECT cancelled FROM gateway\.job_control_v", self._gateway_cancel),
            (
                r"^SELECT \(SELECT status FROM {s}\.runs WHERE job_id = \$1\) AS status,",
                self._run_and_gateway,
            ),
        ]
        self._handlers = [
            (re.compile(p.replace("{s}", re.escape(schema))), h) for p, h in statements
        ]

    def pool(self) -> FakePool:
        return FakePool(self)

    def events(self, topic: str | None = None) -> list[Envelope]:
        """Envelopes enqueued so far, in order (to `topic` only, when given)."""
        return [env for t, _, env in self.outbox if topic is None or t == topic]

    def run(self, sql: str, args: tuple[Any, ...]) -> Any:
        statement = " ".join(sql.split())
        for pattern, handler in self._handlers:
            if pattern.search(statement):
                return handler(*args)
        raise AssertionError(f"FakeDatabase does not know this statement: {statement}")

    # --- runs ---------------------------------------------------------------------------------

    def _copy(self, job_id: uuid.UUID) -> Row | None:
        row = self.runs.get(job_id)
        return None if row is None else dict(row)

    def _run_status(self, job_id: uuid.UUID) -> str | None:
        row = self.runs.get(job_id)
        return None if row is None else str(row["status"])

    def _run_row(self, job_id: uuid.UUID) -> Row | None:
        return self._copy(job_id)

    def _insert_run(
        self, job_id: uuid.UUID | None, cohort_id: uuid.UUID, stage: str, request: Row, status: str
    ) -> None:
        self.runs.setdefault(
            job_id,
            {
                "job_id": job_id,
                "cohort_id": cohort_id,
                "stage": stage,
                "request": request,
                "status": status,
                "items_total": 0,
                "items_done": 0,
                "items_failed": 0,
                "errors": [],
                "summary": {},
                "last_progress_at": None,
                "plan_attempts": 0,
                "upstream_open": False,
            },
        )

    def _open_run(
        self, job_id: uuid.UUID, cohort_id: uuid.UUID, stage: str, request: Row
    ) -> Row | None:
        if job_id in self.runs:
            return None
        self._insert_run(job_id, cohort_id, stage, request, "running")
        self.runs[job_id]["upstream_open"] = True
        return dict(self.runs[job_id])

    def _grow_run(self, job_id: uuid.UUID, added: int, upstream_open: bool) -> Row:
        row = self.runs[job_id]
        row["items_total"] += added
        row["upstream_open"] = upstream_open
        return dict(row)

    def _abandon_run(self, job_id: uuid.UUID, errors: list[Row]) -> Row | None:
        row = self.runs.get(job_id)
        if row is None or row["status"] not in ("planning", "running"):
            return None
        row.update(status="cancelled", errors=row["errors"] + errors)
        return dict(row)

    def _count_plan(self, job_id: uuid.UUID, step: int) -> int | None:
        row = self.runs.get(job_id)
        if row is None or row["status"] != "planning":
            return None
        row["plan_attempts"] += step
        return int(row["plan_attempts"])

    def _open_runs(self) -> list[Row]:
        return [
            {"job_id": r["job_id"]}
            for r in self.runs.values()
            if r["status"] in ("planning", "running")
        ]

    def _progress_due(self, job_id: uuid.UUID, interval_s: float) -> bool | None:
        row = self.runs[job_id]
        now = time.monotonic()
        if row["last_progress_at"] is not None and now - row["last_progress_at"] < interval_s:
            return None
        row["last_progress_at"] = now
        return True

    def _start_run(self, job_id: uuid.UUID, total: int) -> Row | None:
        row = self.runs.get(job_id)
        if row is None or row["status"] != "planning":
            return None
        row.update(status="running", items_total=total)
        return dict(row)

    def _count_item(
        self,
        job_id: uuid.UUID,
        done: int,
        failed: int,
        summary: Row,
        errors: list[Row],
        interval_s: float,
    ) -> Row:
        row = self.runs[job_id]
        row["items_done"] += done
        row["items_failed"] += failed
        row.update(summary=summary, errors=errors)
        return {**row, "progress_due": bool(self._progress_due(job_id, interval_s))}

    def _end_run(self, job_id: uuid.UUID, status: str, summary: Row) -> Row | None:
        row = self.runs[job_id]
        if row["status"] != "running":
            return None
        row.update(status=status, summary=summary)
        return dict(row)

    def _fail_run(self, job_id: uuid.UUID, errors: list[Row]) -> Row | None:
        row = self.runs.get(job_id)
        if row is None or row["status"] not in ("planning", "running"):
            return None
        row.update(status="failed", errors=row["errors"] + errors)
        return dict(row)

    def _cancel_run(self, job_id: uuid.UUID) -> None:
        row = self.runs.get(job_id)
        if row is not None and row["status"] in ("planning", "running"):
            row["status"] = "cancelled"

    # --- items --------------------------------------------------------------------------------

    def _insert_item(self, job_id: uuid.UUID, key: str) -> None:
        self.items.setdefault(
            (job_id, key),
            {"status": "pending", "attempts": 0, "error": None, "result": None, "worker": None},
        )

    def _append_items(self, job_id: uuid.UUID, keys: list[str]) -> list[Row]:
        new = [k for k in dict.fromkeys(keys) if (job_id, k) not in self.items]
        for key in new:
            self._insert_item(job_id, key)
        return [{"item_key": k} for k in new]

    def _count_attempt(self, job_id: uuid.UUID, key: str) -> int | None:
        item = self.items.get((job_id, key))
        if item is None or item["status"] != "pending":
            return None
        item["attempts"] += 1
        return int(item["attempts"])

    def _start_item(self, job_id: uuid.UUID, key: str) -> Row | None:
        attempts = self._count_attempt(job_id, key)
        if attempts is None:
            return None
        return {"attempts": attempts, "status": self.runs[job_id]["status"]}

    def _end_item_locked(self, *args: Any) -> Row | None:
        """The item ended (when pending) and its run's summary and errors read."""
        if not self._end_item(*args):
            return None
        return self._run_row(args[0])

    def _end_item(
        self, job_id: uuid.UUID, key: str, status: str, error: str | None, result: Row, worker: str
    ) -> bool | None:
        item = self.items.get((job_id, key))
        if item is None or item["status"] != "pending":
            return None
        item.update(status=status, error=error, result=result, worker=worker)
        return True

    # --- outbox and the gateway's view --------------------------------------------------------

    def _enqueue(
        self, _id: uuid.UUID, topic: str, key: str | None, envelope: Row, _channel: str
    ) -> None:
        self.outbox.append((topic, key, Envelope.model_validate(envelope)))

    def _unsent(self, limit: int) -> list[Row]:
        rows = [
            {"seq": i + 1, "topic": t, "key": k, "envelope": e.model_dump(mode="json")}
            for i, (t, k, e) in enumerate(self.outbox)
            if i + 1 not in self.sent
        ]
        return rows[:limit]

    def _mark_sent(self, seqs: list[int]) -> None:
        self.sent.update(seqs)

    def _relation_exists(self, name: str) -> bool:
        return name == "gateway.job_control_v" and self.gateway_cancelled is not None

    def _run_and_gateway(self, job_id: uuid.UUID) -> Row:
        return {"status": self._run_status(job_id), "cancelled": self._gateway_cancel(job_id)}

    def _gateway_cancel(self, job_id: uuid.UUID) -> bool:
        return self.gateway_cancelled is not None and job_id in self.gateway_cancelled


class FakeConnection:
    def __init__(self, db: FakeDatabase) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> str:
        self._db.run(sql, args)
        return "OK"

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            self._db.run(sql, row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return self._db.run(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = self._db.run(sql, args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._db.run(sql, args)
        return row

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield  # one coroutine at a time touches the dicts: nothing to isolate


class FakePool:
    def __init__(self, db: FakeDatabase) -> None:
        self._db = db

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[FakeConnection]:
        yield FakeConnection(self._db)

    def acquire(self) -> Any:
        return self._acquire()

    async def release(self, conn: FakeConnection) -> None:
        pass
