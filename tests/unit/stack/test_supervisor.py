"""The supervisor's decisions on a fake stack: when it restarts, how long it waits, what it forgets.

(The real restart of a killed service is tests/integration/test_stack.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cohortflow.stack import ServiceInfo, StackError, StackInfo
from cohortflow.stack import supervisor as supervisor_module
from cohortflow.stack.supervisor import Backoff, Supervisor

ALIVE = os.getpid()  # a pid that runs (this test), under a program name it matches
DEAD = 2**22 + 12345  # above pid_max's default: never runs


class FakeStack:
    """Records services in memory; `restart_service` gives them a live pid or fails."""

    home = Path("/nowhere")

    def __init__(self, **pids: int | None) -> None:
        self.info = StackInfo(
            home=self.home,
            database_url="",
            kafka_bootstrap="",
            s3_endpoint="",
            gateway_url="",
            s3_engine="",
            broker_storage="",
            env_vars={},
            infra={},
            services={key: _svc(key, pid) for key, pid in pids.items()},
        )
        self.restarts: list[str] = []
        self.fail = False

    def recorded(self) -> StackInfo:
        return self.info

    def handle(self, key: str) -> subprocess.Popen[bytes] | None:
        return None

    def restart_service(self, key: str, why: str) -> ServiceInfo | None:
        self.restarts.append(key)
        svc = self.info.services.get(key)
        if svc is None:
            return None
        if self.fail:
            raise StackError(f"{key} exited with code 1 before it was ready")
        svc.pid, svc.restarts, svc.last_restart = ALIVE, svc.restarts + 1, why
        return svc


def _svc(key: str, pid: int | None) -> ServiceInfo:
    return ServiceInfo(service=key, program="", port=1, url="", log="", pid=pid)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module.log, "disabled", True)


def test_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 7, 8, 20)] == [1, 2, 4, 8, 60, 60, 60]


def test_a_dead_service_is_restarted_after_the_delay_not_before() -> None:
    stack = FakeStack(extractor=DEAD, gateway=ALIVE)
    watcher = Supervisor(stack)  # type: ignore[arg-type]
    watcher.tick(100.0)
    watcher.tick(100.9)
    assert stack.restarts == []
    watcher.tick(101.0)
    assert stack.restarts == ["extractor"]
    assert stack.info.services["extractor"].restarts == 1
    watcher.tick(102.0)
    assert stack.restarts == ["extractor"]  # alive again: nothing more


def test_consecutive_deaths_wait_longer_and_a_stable_service_starts_over() -> None:
    stack = FakeStack(sorter=DEAD)
    watcher = Supervisor(stack, Backoff(initial_s=1, max_s=60, stable_after_s=30))  # type: ignore[arg-type]
    watcher.tick(0.0)
    watcher.tick(1.0)  # restart 1
    stack.info.services["sorter"].pid = DEAD
    watcher.tick(2.0)  # death 2: 2 s
    watcher.tick(3.9)
    assert len(stack.restarts) == 1
    watcher.tick(4.0)
    assert len(stack.restarts) == 2
    watcher.tick(50.0)  # up for longer than stable_after_s: forgiven
    stack.info.services["sorter"].pid = DEAD
    watcher.tick(51.0)
    watcher.tick(52.0)
    assert len(stack.restarts) == 3  # after 1 s again, not 4 s


def test_a_restart_that_fails_is_tried_again_later() -> None:
    stack = FakeStack(exporter=DEAD)
    stack.fail = True
    watcher = Supervisor(stack)  # type: ignore[arg-type]
    watcher.tick(0.0)
    watcher.tick(1.0)  # fails: death 2, next in 2 s
    watcher.tick(2.5)
    assert stack.restarts == ["exporter"]
    stack.fail = False
    watcher.tick(3.0)
    assert stack.restarts == ["exporter", "exporter"]


def test_a_service_stopped_on_purpose_is_forgotten() -> None:
    stack = FakeStack(sorter=DEAD)
    watcher = Supervisor(stack)  # type: ignore[arg-type]
    watcher.tick(0.0)
    del stack.info.services["sorter"]  # `stop_service` removed it from the state file
    watcher.tick(5.0)
    assert stack.restarts == [] and watcher.watches == {}
