"""Supervision end to end on the test stack (ADR 0019): an extractor killed in the middle of a run
is restarted by the supervisor and the run completes with every instance catalogued once (its
unfinished items were delivered again); a job whose service is gone is marked stalled within
COHORTFLOW_STALL_AFTER_S, `cohortflow run` says so and exits 1, and the job goes on when the
service is back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from cohortflow.stack import LocalStack

pytestmark = pytest.mark.integration

STALL_AFTER_S = 5
SERVICES = ("gateway", "extractor")
ENV = {"COHORTFLOW_STALL_AFTER_S": str(STALL_AFTER_S), "COHORTFLOW_HEARTBEAT_INTERVAL_S": "1"}


@pytest.fixture(scope="module")
def gateway(stack: LocalStack) -> Iterator[httpx.Client]:
    """The gateway and the extractor running on a stack whose stall time is short (the stack's
    stored settings are changed for this module, as `stack up --reconfigure` would, then back)."""
    stored = stack.status().settings
    saved = {key: os.environ.get(key) for key in ENV}

    def reconfigure(values: dict[str, str]) -> None:
        os.environ.update(values)
        stack.up(services=[], reconfigure=True)  # running services restart with the values

    reconfigure(ENV)
    started = [name for name in SERVICES if name not in stack.status().services]
    try:
        for name in started:
            stack.start_service(name)
        with httpx.Client(base_url=stack.status().gateway_url, timeout=30) as client:
            yield client
    finally:
        for name in started:
            stack.stop_service(name)
        reconfigure({key: stored[key] for key in ENV})
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cohort(gateway: httpx.Client, name: str, source: Path) -> str:
    created = gateway.post("/api/cohorts", json={"name": name, "source_path": str(source)})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _wait_job(
    gateway: httpx.Client, job_id: str, done: Any, what: str, timeout: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = gateway.get(f"/api/jobs/{job_id}").json()
        if done(job):
            return dict(job)
        assert time.monotonic() < deadline, f"waited {timeout:.0f}s for {what}: {job}"
        time.sleep(0.2)


async def test_a_killed_extractor_is_restarted_and_the_run_completes_exactly_once(
    stack: LocalStack, gateway: httpx.Client, db_pool: asyncpg.Pool, dicom_root: Path
) -> None:
    source = dicom_root / "dcm_qa_nih"
    files = sum(1 for p in source.rglob("*") if p.is_file())
    cohort = _cohort(gateway, "killed-mid-run", source)
    # small batches: many items, so the kill lands between and inside them
    started = gateway.post(
        f"/api/cohorts/{cohort}/stages/extraction/run", json={"config": {"batch_files": 10}}
    )
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    _wait_job(gateway, job_id, lambda j: j["items_done"] >= 3, "the first items")
    before = stack.status().services["extractor"]

    stack.kill_service("extractor", signal.SIGKILL)  # the service and its worker pool
    killed_at = time.monotonic()

    job = _wait_job(gateway, job_id, lambda j: j["status"] in ("completed", "failed"), "the end")
    after = stack.status().services["extractor"]
    assert after.pid != before.pid and after.restarts == before.restarts + 1
    print(f"killed -> job completed {time.monotonic() - killed_at:.1f}s later")
    assert job["status"] == "completed" and job["items_failed"] == 0, job
    assert job["items_done"] == job["items_total"]
    counts = await db_pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS distinct_n"
        " FROM catalog.instance WHERE cohort_id = $1",
        uuid.UUID(cohort),
    )
    assert counts["n"] == counts["distinct_n"] > 0
    assert job["summary"]["instances"] == counts["n"]
    assert counts["n"] + job["summary"].get("rejected", 0) <= files


def test_a_job_nobody_works_on_is_stalled_and_cohortflow_run_says_so(
    stack: LocalStack, gateway: httpx.Client, dicom_root: Path, tmp_path: Path
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "pdt2").symlink_to(dicom_root / "dcm_qa_pdt2" / "In", target_is_directory=True)
    stack.stop_service("extractor")  # on purpose: the supervisor leaves it stopped
    env = {**os.environ, "COHORTFLOW_GATEWAY_URL": str(gateway.base_url)}
    command = [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", "stalls",
               "--stages", "extraction", "--json"]  # fmt: skip
    started = time.monotonic()
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    waited = time.monotonic() - started
    print(f"cohortflow run -> stalled, exit {ran.returncode}: {waited:.1f}s")
    assert ran.returncode == 1, ran.stdout[-2000:] + ran.stderr[-2000:]
    said = " ".join(ran.stderr.split())  # as written, wrapped to the terminal's width
    assert "stalled: no word from the extraction service" in said
    assert "run the same command again" in said
    assert waited < STALL_AFTER_S + 20

    jobs = gateway.get("/api/jobs", params={"stage": "extraction", "status": "pending"}).json()
    job = next(j for j in jobs if j["status_reason"] and "stalled" in j["status_reason"])
    assert job["status_reason"].startswith("stalled: ")

    stack.start_service("extractor")  # the service is back: the job goes on, the mark goes
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    followed = json.loads(again.stdout)["jobs"]
    assert [(j["id"], j["status"]) for j in followed] == [(job["id"], "completed")]
    assert not (followed[0]["status_reason"] or "").startswith("stalled")
