"""Studies streamed through the stages (ADR 0023) on the real stack: `cohortflow run --anonymize`
on several studies extracts the first de-identified study while the anonymizer still works on the
others, and gives the same catalog and the same BIDS tree as the same stages run by hand one
after the other on the whole cohort (`--stages`, no routing slip: nothing streamed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.polling import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.stack_services("all"),
]

STAGES = ["anonymization", "extraction", "sorting", "export"]


# every stage's schema (its runs, run_items and outbox), in slip order
SCHEMAS = {
    "anonymization": "anonymizer",
    "extraction": "catalog",
    "sorting": "sorting",
    "export": "export",
}
# one `cohortflow run` of six studies takes well under a minute: a run still going after this long
# is stuck, and the test says where (two runs and the checks stay within pytest's own timeout)
CLI_TIMEOUT_S = 240


async def _where_it_stands(pool: asyncpg.Pool, cohort_name: str) -> str:
    """What a failure needs to be understood: the cohort's jobs as the gateway has them, each
    stage's run of that job and its unfinished items, and the events not yet sent by each stage."""
    lines = [f"cohort {cohort_name}:"]
    jobs = await pool.fetch(
        "SELECT j.id, j.stage, j.status, j.status_reason, j.items_total, j.items_done,"
        " j.items_failed, j.errors::text FROM gateway.jobs j JOIN gateway.cohorts c"
        " ON c.id = j.cohort_id WHERE c.name = $1 ORDER BY j.created_at, j.position",
        cohort_name,
    )
    if not jobs:
        # the gateway the test talked to is not this stack's (another process on its port?)
        lines.append("  no job of this cohort in this stack's database")
    for j in jobs:
        lines.append(
            f"  job {j['stage']} {j['id']}: {j['status']} ({j['status_reason']}),"
            f" items {j['items_done']}+{j['items_failed']} failed of {j['items_total']},"
            f" errors {j['errors'][:500]}"
        )
        schema = SCHEMAS[j["stage"]]
        run = await pool.fetchrow(
            f"SELECT status, upstream_open, items_total, items_done, items_failed,"
            f" errors::text, updated_at, finished_at FROM {schema}.runs WHERE job_id = $1",
            j["id"],
        )
        lines.append(f"    run: {dict(run) if run is not None else None}")
        unfinished = await pool.fetch(
            f"SELECT item_key, status, attempts, worker, updated_at FROM {schema}.run_items"
            " WHERE job_id = $1 AND status <> 'done' ORDER BY item_key",
            j["id"],
        )
        lines += [f"    item not done: {dict(r)}" for r in unfinished[:20]]
    for schema in ("gateway", *SCHEMAS.values()):
        unsent = await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
        lines.append(f"  {schema}: {unsent} outbox events not sent")
    return "\n".join(lines)


async def _explained(waiting: Awaitable[Any], pool: asyncpg.Pool, cohort_name: str) -> Any:
    """`waiting` (an `eventually`); its failure also says where the cohort's jobs and runs stand."""
    try:
        return await waiting
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await _where_it_stands(pool, cohort_name)}") from None


async def _run(
    pool: asyncpg.Pool, gateway_url: str, source: Path, name: str, out: Path, *extra: str
) -> dict[str, Any]:
    env = {
        **os.environ,
        "COHORTFLOW_GATEWAY_URL": gateway_url,
        "COHORTFLOW_AUDIT_PASSWORD": "streaming-audit-password",
    }
    command = [
        sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", name,
        "--anonymize", "--out", str(out), "--json", *extra,
    ]  # fmt: skip
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = [
            o if isinstance(o, str) else (o or b"").decode(errors="replace")
            for o in (exc.stdout, exc.stderr)
        ]
        raise AssertionError(
            f"cohortflow run {name} still going after {CLI_TIMEOUT_S} s\n"
            + await _where_it_stands(pool, name)
            + "\n"
            + output[1][-3000:]
        ) from None
    assert done.returncode == 0, (
        done.stdout[-3000:] + done.stderr[-3000:] + "\n" + await _where_it_stands(pool, name)
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    assert [j["stage"] for j in doc["jobs"]] == STAGES
    assert all(j["status"] == "completed" for j in doc["jobs"]), await _where_it_stands(pool, name)
    return doc


def _tree(root: Path, cohort_name: str) -> dict[str, str]:
    """Every file of a tree by relative path, with its content's digest (the dataset's name, in
    README and dataset_description.json, is the cohort's, which differs by design)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(
            p.read_bytes().replace(cohort_name.encode(), b"<cohort>")
        ).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def _item_ends(pool: asyncpg.Pool, schema: str, job_id: str) -> list[Any]:
    """When each item of a run ended, in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT updated_at FROM {schema}.run_items WHERE job_id = $1 AND status = 'done'"
            " ORDER BY updated_at",
            uuid.UUID(job_id),
        )
    return [r["updated_at"] for r in rows]


async def _catalog(pool: asyncpg.Pool, cohort_id: str) -> list[tuple[Any, ...]]:
    """The cohort's stacks and their classification, without the cohort's own ids."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT s.study_instance_uid, s.series_instance_uid, s.stack_key, s.summary,"
            " c.intent, c.bids_suffix, c.entities::text FROM catalog.stack_summary_v s"
            " LEFT JOIN sorting.classification_v c ON c.cohort_id = s.cohort_id"
            " AND c.series_instance_uid = s.series_instance_uid AND c.stack_key = s.stack_key"
            " WHERE s.cohort_id = $1 ORDER BY 1, 2, 3",
            uuid.UUID(cohort_id),
        )
    found = []
    for r in rows:
        summary = r["summary"] if isinstance(r["summary"], dict) else json.loads(r["summary"])
        summary.pop("cohort_id", None)
        found.append((*r[:3], summary, *r[4:]))
    return found


async def test_a_streamed_run_overlaps_the_stages_and_gives_the_same_result(
    gateway_url: str, tmp_path: Path, dicom_root: Path, db_pool: asyncpg.Pool
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    for name in ("dcm_qa_deident", "dcm_qa_pdt2", "dcm_qa_fmap"):  # six studies
        (source / name).symlink_to(dicom_root / name / "In", target_is_directory=True)
    suffix = uuid.uuid4().hex[:6]
    streamed = await _run(db_pool, gateway_url, source, f"streamed-{suffix}", tmp_path / "streamed")
    by_hand = await _run(
        db_pool,
        gateway_url,
        source,
        f"by-hand-{suffix}",
        tmp_path / "by-hand",
        "--stages",
        ",".join(STAGES),
    )

    async def ends(doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """When the anonymization and the extraction items of a run ended."""
        anon, extraction = doc["jobs"][0]["id"], doc["jobs"][1]["id"]
        return await _item_ends(db_pool, "anonymizer", anon), await _item_ends(
            db_pool, "catalog", extraction
        )

    # streamed: a de-identified study was catalogued before the anonymizer's last study ended
    anonymized, extracted = await ends(streamed)
    assert len(anonymized) == 6 and extracted
    assert extracted[0] < anonymized[-1], (extracted, anonymized)
    # by hand, each stage waits for the whole cohort to finish the one before
    anonymized, extracted = await ends(by_hand)
    assert extracted[0] > anonymized[-1]

    # the same outputs: counts, catalog and classifications, and the BIDS tree file for file
    for stage in STAGES:
        a, b = (next(j for j in d["jobs"] if j["stage"] == stage) for d in (streamed, by_hand))
        assert a["items_failed"] == b["items_failed"] == 0, (a["errors"], b["errors"])
    ext_a, ext_b = (d["jobs"][1]["summary"] for d in (streamed, by_hand))
    for key in ("subjects", "studies", "series", "instances"):
        assert ext_a[key] == ext_b[key], key
    catalog_a = await _catalog(db_pool, streamed["cohort"]["id"])
    assert catalog_a and catalog_a == await _catalog(db_pool, by_hand["cohort"]["id"])
    tree_a = _tree(tmp_path / "streamed", streamed["cohort"]["name"])
    tree_b = _tree(tmp_path / "by-hand", by_hand["cohort"]["name"])
    assert any(p.endswith(".nii.gz") for p in tree_a)
    assert tree_a.keys() == tree_b.keys()
    differ = sorted(p for p in tree_a if tree_a[p] != tree_b[p])
    assert differ == [], differ


async def test_a_cancel_ends_the_open_runs_of_a_streamed_run(
    gateway_url: str, tmp_path: Path, dicom_root: Path, db_pool: asyncpg.Pool
) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    for name in ("dcm_qa_deident", "dcm_qa_fmap"):
        (source / name).symlink_to(dicom_root / name / "In", target_is_directory=True)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as api:
        cohort_name = f"cancel-streamed-{uuid.uuid4().hex[:6]}"
        body = {
            "name": cohort_name,
            "source_path": str(source),
            "anonymization_enabled": True,
        }
        cohort = (await api.post("/api/cohorts", json=body)).json()
        config = {"audit_export": {"format": "csv", "password": "streaming-audit-password"}}
        started = await api.post(
            f"/api/cohorts/{cohort['id']}/pipeline", json={"anonymization": config}
        )
        assert started.status_code == 202, started.text
        jobs = [j["id"] for j in started.json()["jobs"]]

        async def job(job_id: str) -> dict[str, Any]:
            return dict((await api.get(f"/api/jobs/{job_id}")).json())

        async def open_and_waiting() -> bool:
            later = [await job(j) for j in jobs[1:]]
            return all(
                j["status"] == "running" and j["status_reason"].startswith("open:") for j in later
            )

        # the later jobs run from the start, open, while the anonymizer works
        await _explained(
            eventually(open_and_waiting, timeout=60, what="every later job open"),
            db_pool,
            cohort_name,
        )
        assert (await job(jobs[0]))["status"] == "running", await _where_it_stands(
            db_pool, cohort_name
        )
        assert (await api.post(f"/api/jobs/{jobs[0]}/cancel")).status_code == 200

        async def runs_ended() -> list[str] | None:
            statuses = []
            for schema, job_id in zip(
                ("anonymizer", "catalog", "sorting", "export"), jobs, strict=True
            ):
                status = await db_pool.fetchval(
                    f"SELECT status FROM {schema}.runs WHERE job_id = $1", uuid.UUID(job_id)
                )
                statuses.append(status)
            return statuses if set(statuses) == {"cancelled"} else None

        # every stage's run, open ones included, ends cancelled: none is left waiting
        await _explained(
            eventually(runs_ended, timeout=60, what="every stage run cancelled"),
            db_pool,
            cohort_name,
        )
        assert [(await job(j))["status"] for j in jobs] == ["cancelled"] * 4
