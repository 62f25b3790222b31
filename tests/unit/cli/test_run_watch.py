"""`cohortflow run` follows a run through requests the gateway holds until a job changed: it sees
the end at once and sleeps never; a gateway that cannot hold is asked job by job."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from cohortflow.run import HOLD_S, RunOptions, _watch


def _job(job_id: str, status: str, done: int = 0) -> dict[str, Any]:
    return {
        "id": job_id,
        "run_id": "r1",
        "stage": {"a": "extraction", "b": "export"}[job_id],
        "status": status,
        "status_reason": None,
        "items_total": 2,
        "items_done": done,
        "items_failed": 0,
    }


class HoldingGateway:
    """Answers `run_jobs` from a script: a list of jobs (a change) or None (held, no change)."""

    def __init__(self, *answers: list[dict[str, Any]] | None) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str | None, float]] = []

    def run_jobs(
        self, run_id: str, etag: str | None = None, wait_s: float = 0.0
    ) -> tuple[list[dict[str, Any]] | None, str | None]:
        assert run_id == "r1"
        self.asked.append((etag, wait_s))
        answer = self.answers.pop(0)
        return answer, etag if answer is None else f'"{len(self.answers)}"'

    def job(self, job_id: str) -> dict[str, Any]:
        raise AssertionError("a holding gateway is not asked job by job")


class PlainGateway:
    """A gateway without the held answer: no ETag, and `run_id` not understood."""

    def __init__(self) -> None:
        self.asked = 0

    def run_jobs(
        self, run_id: str, etag: str | None = None, wait_s: float = 0.0
    ) -> tuple[list[dict[str, Any]] | None, str | None]:
        return [_job("a", "running")], None

    def job(self, job_id: str) -> dict[str, Any]:
        self.asked += 1
        return _job(job_id, "completed", 2)


def _watching(gateway: object, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # a poll interval no test would survive: the held path must never sleep
    options = RunOptions(source=Path("/data"), name="c", as_json=True, poll_s=3600.0)
    return _watch(gateway, jobs, Console(file=io.StringIO()), options)  # type: ignore[arg-type]


def test_a_held_watch_ends_when_the_last_job_ends_without_sleeping() -> None:
    gateway = HoldingGateway(
        [_job("a", "running", 1), _job("b", "running")],
        None,
        [_job("a", "completed", 2), _job("b", "running", 1)],
        [_job("a", "completed", 2), _job("b", "completed", 2)],
    )
    jobs = _watching(gateway, [_job("a", "pending"), _job("b", "pending")])
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    # the first request has nothing to compare with; every later one is held
    assert gateway.asked[0][0] is None
    assert all(etag is not None and wait == HOLD_S for etag, wait in gateway.asked[1:])


def test_a_gateway_that_cannot_hold_is_asked_job_by_job() -> None:
    gateway = PlainGateway()
    jobs = _watching(gateway, [_job("a", "pending")])
    assert jobs[0]["status"] == "completed" and gateway.asked == 1
