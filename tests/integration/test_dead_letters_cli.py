"""`cohortflow dlq` against the real services of the test stack: a dead letter published on a
stage's dead-letter topic is kept by the gateway, listed and shown by the CLI, and its replay
redoes the stage and the stages after it through the real services."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from shared import topics
from shared.events import CohortRef, DeadLetter, Envelope, WorkItem
from shared.topics import Stage
from tests.integration.polling import eventually_blocking, wait_job_blocking

pytestmark = [
    pytest.mark.integration,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.stack_services("gateway", "extractor", "sorter", "exporter"),
]


def _dlq(gateway_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COHORTFLOW_GATEWAY_URL": gateway_url}
    return subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "dlq", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def _publish(bootstrap: str, envelope: Envelope) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.dlq(Stage.sorting), envelope.model_dump_json().encode(), key=b"stack-1"
        )
    finally:
        await producer.stop()


def test_a_dead_letter_is_listed_shown_and_its_replay_redoes_the_work(
    gateway_url: str, kafka_bootstrap: str, tmp_path: Path, dicom_root: Path
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "ct").symlink_to(dicom_root / "dcm_qa_ct" / "In", target_is_directory=True)
    api = httpx.Client(base_url=gateway_url, timeout=60)
    created = api.post(
        "/api/cohorts", json={"name": f"dlq-{uuid.uuid4().hex[:8]}", "source_path": str(source)}
    )
    assert created.status_code == 201, created.text
    cohort = created.json()
    run = api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={}).json()
    jobs = {j["stage"]: wait_job_blocking(api, j["id"], 600) for j in run["jobs"]}
    assert {j["status"] for j in jobs.values()} == {"completed"}, jobs

    # what the sorter publishes when it gives up on an item of that (now ended) job
    item = WorkItem(
        stage=Stage.sorting,
        cohort=CohortRef(id=cohort["id"], name=cohort["name"], source_path=cohort["source_path"]),
        item_key="stack-1",
        config=jobs["sorting"]["config"],
    )
    letter = Envelope.wrap(
        DeadLetter(
            topic=topics.items(Stage.sorting),
            error="RuntimeError: the classifier's model was not reachable",
            attempts=3,
            original=item.model_dump(mode="json"),
        ),
        source="sorter",
        cohort_id=uuid.UUID(cohort["id"]),
        job_id=uuid.UUID(jobs["sorting"]["id"]),
        correlation_id=uuid.UUID(run["run_id"]),
    )
    asyncio.run(_publish(kafka_bootstrap, letter))

    def listed() -> list[dict[str, Any]] | None:
        done = _dlq(gateway_url, "list", "--cohort", cohort["id"], "--json")
        assert done.returncode == 0, done.stderr
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found or None

    (row,) = eventually_blocking(listed, 30, 0.5)
    assert (row["id"], row["kind"], row["status"]) == (str(letter.id), "item", "open")
    table = _dlq(gateway_url, "list", "--cohort", cohort["id"])
    assert str(letter.id) in table.stdout and "classifier" in table.stdout
    shown = _dlq(gateway_url, "show", str(letter.id))
    assert json.loads(shown.stdout)["original"]["item_key"] == "stack-1"

    replayed = _dlq(gateway_url, "replay", str(letter.id), "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    again = json.loads(replayed.stdout)
    assert [j["stage"] for j in again["jobs"]] == ["sorting", "export"]
    redone = [wait_job_blocking(api, j["id"], 600) for j in again["jobs"]]
    assert [j["status"] for j in redone] == ["completed", "completed"], redone
    assert redone[0]["items_total"] == jobs["sorting"]["items_total"]  # the stage was redone

    after = _dlq(gateway_url, "list", "--cohort", cohort["id"], "--status", "replayed", "--json")
    assert [r["replay_run_id"] for r in json.loads(after.stdout)] == [again["run_id"]]
    refused = _dlq(gateway_url, "discard", str(letter.id))
    assert refused.returncode != 0 and "already replayed" in refused.stderr
    missing = _dlq(gateway_url, "show", str(uuid.uuid4()))
    assert missing.returncode != 0 and "no dead letter" in missing.stderr
