"""`cohortflow run` at a stalled job: it stops waiting with the reason, but gives a job that was
already stalled when it began following it (a re-run after fixing the service) time to resume."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cohortflow import run as run_module
from cohortflow.run import RunError, RunOptions, _watch

STALL = "stalled: no word from the extraction service for over 300 s: it is down"


class FakeGateway:
    """Answers `job(id)` from a script of states, the last one repeated."""

    def __init__(self, *states: dict[str, Any]) -> None:
        self.states: Iterator[dict[str, Any]] = iter(states)
        self.last = states[0]

    def job(self, job_id: str) -> dict[str, Any]:
        self.last = next(self.states, self.last)
        return self.last


def _job(status: str, reason: str | None = None, done: int = 0) -> dict[str, Any]:
    return {
        "id": "j1",
        "stage": "extraction",
        "status": status,
        "status_reason": reason,
        "items_total": 4,
        "items_done": done,
        "items_failed": 0,
    }


def _watching(gateway: FakeGateway, first: dict[str, Any]) -> list[dict[str, Any]]:
    options = RunOptions(source=Path("/data"), name="c", as_json=True, poll_s=0.0)
    return _watch(gateway, [first], Console(file=io.StringIO()), options)  # type: ignore[arg-type]


def test_a_stall_that_arises_while_following_ends_the_wait_with_its_reason() -> None:
    gateway = FakeGateway(_job("running", done=1), _job("running", STALL, done=1))
    with pytest.raises(RunError) as stalled:
        _watching(gateway, _job("running"))
    assert STALL in str(stalled.value) and "run the same command again" in str(stalled.value)


def test_a_job_already_stalled_gets_the_grace_period_to_resume() -> None:
    gateway = FakeGateway(
        _job("pending", STALL),
        _job("pending", STALL),
        _job("running", None, done=2),
        _job("completed", None, done=4),
    )
    [job] = _watching(gateway, _job("pending", STALL))
    assert job["status"] == "completed"


def test_a_job_still_stalled_after_the_grace_period_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_module, "STALL_GRACE_S", 0.0)
    gateway = FakeGateway(_job("pending", STALL))
    with pytest.raises(RunError, match="stalled"):
        _watching(gateway, _job("pending", STALL))


def test_a_stall_mark_that_was_lifted_and_comes_back_is_reported() -> None:
    gateway = FakeGateway(
        _job("pending", STALL), _job("running", None, done=1), _job("running", STALL, done=1)
    )
    with pytest.raises(RunError, match="stalled"):
        _watching(gateway, _job("pending", STALL))
