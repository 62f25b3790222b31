"""Retraction in an anonymized cohort, through the real services (ADR 0025): a cohort of two studies
is anonymized and exported; a hospital system retracts one by its ORIGINAL StudyInstanceUID; the
next export leaves out exactly the de-identified copy of that study (the other study's files
unchanged, the validator clean); a later `study.available` takes it back. The original UID and the
sender's free-text reason are stored nowhere past the gateway's notice log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from cohortflow.stack import LocalStack
from shared import topics
from tests.integration.polling import eventually, wait_job
from tests.integration.studies import study_uid

pytestmark = [
    pytest.mark.integration,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.stack_services("gateway", "anonymizer", "extractor", "sorter", "exporter"),
]

SENDER = "/hospital/pacs-it"
WHY = "consent withdrawn by Jane Roe-Whitfield"  # free text that names a person
JOB_TIMEOUT_S = 900.0
EXPORT: dict[str, Any] = {}  # the defaults, as `cohortflow run` exported


@pytest_asyncio.fixture(loop_scope="session")
async def api(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60.0) as client:
        yield client


async def run_export(api: httpx.AsyncClient, cohort_id: str) -> dict[str, Any]:
    response = await api.post(
        f"/api/cohorts/{cohort_id}/stages/export/run", json={"config": EXPORT}
    )
    assert response.status_code == 202, response.text
    job = await wait_job(api, response.json()["id"], JOB_TIMEOUT_S)
    assert job["status"] == "completed", job
    return job


async def files_by_series(api: httpx.AsyncClient, cohort_id: str, job_id: str) -> dict[str, set]:
    """series UID -> {(path, sha256)} of the export's image files."""
    listing = (await api.get(f"/api/cohorts/{cohort_id}/exports/{job_id}")).json()
    out: dict[str, set] = {}
    for f in listing["files"]:
        if f.get("series_instance_uid"):
            out.setdefault(f["series_instance_uid"], set()).add((f["path"], f["sha256"]))
    return out


async def notice(api: httpx.AsyncClient, kind: str, uid: str, data: dict[str, Any]) -> Any:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": f"org.example.pacs.study.{kind}.v1",
        "ce-source": SENDER,
        "ce-id": uuid.uuid4().hex,
        "ce-subject": uid,
        "content-type": "application/json",
    }
    return await api.post("/api/events", content=json.dumps(data), headers=headers)


async def anonymizer_view(db: asyncpg.Pool, cohort_id: str) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT study_instance_uid, reason FROM anonymizer.retracted_studies_v WHERE cohort_id = $1",
        uuid.UUID(cohort_id),
    )
    return {r["study_instance_uid"]: r["reason"] for r in rows}


async def schema_dump(db: asyncpg.Pool, schema: str, cohort_id: str | None = None) -> str:
    """Every row of `schema` as text; with `cohort_id`, only that cohort's rows (tables keyed by
    `cohort_id`, or by `job_id` through the schema's runs, outbox messages about it) and the
    project-wide tables: other
    tests of the session catalogue the same files identified, which is right for them."""
    tables = await db.fetch(
        "SELECT c.table_name, bool_or(c.column_name = 'cohort_id') AS by_cohort,"
        " bool_or(c.column_name = 'job_id') AS by_job"
        " FROM information_schema.columns c JOIN information_schema.tables t"
        " ON t.table_schema = c.table_schema AND t.table_name = c.table_name"
        " WHERE c.table_schema = $1 AND t.table_type = 'BASE TABLE' GROUP BY c.table_name",
        schema,
    )
    has_runs = any(t["table_name"] == "runs" for t in tables)
    dump = []
    for t in tables:
        query = f'SELECT t::text AS row FROM {schema}."{t["table_name"]}" t'
        args: list[object] = []
        if cohort_id is not None and t["by_cohort"]:
            query, args = query + " WHERE cohort_id = $1", [uuid.UUID(cohort_id)]
        elif cohort_id is not None and t["table_name"] == "outbox":  # its envelopes name it
            query, args = query + " WHERE strpos(t.envelope::text, $1) > 0", [cohort_id]
        elif cohort_id is not None and t["by_job"] and has_runs:
            query += f" WHERE job_id IN (SELECT job_id FROM {schema}.runs WHERE cohort_id = $1)"
            args = [uuid.UUID(cohort_id)]
        rows = await db.fetch(query, *args)
        dump += [r["row"] for r in rows]
    return "\n".join(dump)


async def test_a_retracted_study_leaves_the_anonymized_export_until_available_again(
    api: httpx.AsyncClient,
    gateway_url: str,
    db_pool: asyncpg.Pool,
    stack: LocalStack,
    tmp_path: Path,
    dicom_root: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "study-a").symlink_to(
        dicom_root / "dcm_qa_pdt2" / "In" / "Siemens", target_is_directory=True
    )
    (incoming / "study-c").symlink_to(
        dicom_root / "dcm_qa_enh" / "In" / "Siemens", target_is_directory=True
    )
    original = study_uid(incoming / "study-a")
    env = {
        **os.environ,
        "COHORTFLOW_GATEWAY_URL": gateway_url,
        "COHORTFLOW_AUDIT_PASSWORD": "retraction-audit-password",
    }
    name = f"retract-anon-{int(time.time())}"
    # the services' logs from here on (earlier tests of the session log their own cohorts)
    services = ("anonymizer", "extractor", "sorter", "exporter")
    log_start = {s: stack.log_file(s).stat().st_size for s in services}
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", str(incoming), "--name", name,
         "--out", str(tmp_path / "out1"), "--json", "--anonymize"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    cohort_id = json.loads(done.stdout)["cohort_id"]

    # the catalog knows only de-identified studies; study A is the one with 71 instances
    series = (await api.get(f"/api/cohorts/{cohort_id}/series")).json()
    instances: dict[str, int] = {}
    for s in series:
        uid = s["study_instance_uid"]
        instances[uid] = instances.get(uid, 0) + (s["n_instances"] or 0)
    assert len(instances) == 2 and original not in instances
    study_a = max(instances, key=lambda u: instances[u])
    a_series = {s["series_instance_uid"] for s in series if s["study_instance_uid"] == study_a}
    jobs = (await api.get(f"/api/jobs?cohort_id={cohort_id}")).json()
    first = max((j for j in jobs if j["stage"] == "export"), key=lambda j: j["created_at"])
    before = await files_by_series(api, cohort_id, first["id"])
    assert a_series & set(before) and set(before) - a_series, "both studies were exported"

    # retracted by the original UID: the anonymizer records it under the de-identified one
    retracted = await notice(api, "retracted", original, {"location": str(incoming / "study-a"), "cohort": cohort_id,
                                                          "reason": WHY})  # fmt: skip
    assert retracted.status_code == 200 and retracted.json()["outcome"] == "retracted", (
        retracted.text
    )
    seq = retracted.json()["notice"]

    async def recorded() -> dict[str, str]:
        return await anonymizer_view(db_pool, cohort_id)

    view = await eventually(recorded, what="the anonymizer's retraction")
    reason = f"retracted by {SENDER} (notice {seq})"
    assert view == {study_a: reason}

    job = await run_export(api, cohort_id)
    after = await files_by_series(api, cohort_id, job["id"])
    assert not set(after) & a_series, "nothing of the retracted study is exported"
    assert {k: v for k, v in before.items() if k not in a_series} == after, (
        "the other study's files are exported unchanged"
    )
    a_stacks = {s["stack_key"] for x in series if x["study_instance_uid"] == study_a
                for s in x["stacks"]}  # fmt: skip
    # every classified stack of the study is left out with the reason (unclassified ones are not
    # exported anyway)
    assert 0 < job["summary"]["not_exported"].get(f"study {reason}", 0) <= len(a_stacks)
    assert job["summary"]["validator"]["errors"] == 0

    # nothing of the original UID or the sender's words past the gateway's notice log
    words = re.compile(re.escape(original) + "|Roe-Whitfield")
    for schema in ("anonymizer", "catalog", "sorting", "export"):
        assert not words.search(await schema_dump(db_pool, schema, cohort_id)), schema
    for service in services:
        with stack.log_file(service).open("rb") as fh:
            fh.seek(log_start[service])
            log = fh.read().decode(errors="replace")
        assert not words.search(log), f"{service} log"
    asked = await db_pool.fetch(
        "SELECT envelope::text AS e FROM gateway.outbox WHERE topic = $1",
        topics.STUDY_RETRACTIONS,
    )
    assert asked and not any(words.search(r["e"]) for r in asked)
    assert "Roe-Whitfield" not in await schema_dump(db_pool, "gateway")

    # available again: the retraction is taken back, the next export holds the study again
    available = await notice(
        api, "available", original, {"location": str(incoming / "study-a"), "cohort": cohort_id,
                                     "run_pipeline": False},
    )  # fmt: skip
    assert available.status_code in (200, 202), available.text

    async def taken_back() -> bool:
        return not await anonymizer_view(db_pool, cohort_id)

    await eventually(taken_back, what="the retraction taken back")
    job = await run_export(api, cohort_id)
    again = await files_by_series(api, cohort_id, job["id"])
    assert a_series <= set(again) and set(before) == set(again)
    assert job["summary"]["validator"]["errors"] == 0
