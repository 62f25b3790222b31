"""Extraction end to end: the real gateway and extractor services on the real broker, Postgres and
S3 of the test stack, driven through the public HTTP API.

Checks what extraction promises: catalog counts equal an independent pydicom count of the same files, bad files
are recorded as rejected while the run completes, cancel stops the work, and faults (a SIGKILLed
extractor, two replicas, a restarted broker) cost time but never data.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from cohortflow.stack import LocalStack, processes
from cohortflow.stack.processes import tree_pids
from shared.storage import ObjectStore
from shared.subjects import missing_patient_id
from tests.integration.polling import eventually_blocking, wait_job_blocking

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.stack_services("gateway", "extractor"),
]


def link_tree(target: Path, sources: dict[str, Path]) -> Path:
    """A cohort folder of symlinks to the shared data (nothing is copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        (target / name).symlink_to(source, target_is_directory=source.is_dir())
    return target


def independent_count(root: Path) -> dict[str, int]:
    """Subjects, studies, series, instances and rejected files by a plain pydicom walk."""
    patients: set[str] = set()
    studies: set[str] = set()
    series: set[str] = set()
    instances: set[str] = set()
    files = rejected = 0
    for dirpath, _, names in os.walk(root, followlinks=True):
        for name in names:
            files += 1
            try:
                ds = pydicom.dcmread(Path(dirpath) / name, defer_size="1 KB")
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
                rejected += 1
                continue
            uid = str(ds.get("SOPInstanceUID", ""))
            if (
                "PixelData" not in ds
                and "FloatPixelData" not in ds
                and "DoubleFloatPixelData" not in ds
            ):
                rejected += 1  # not an image (presentation state, report, DICOMDIR, ...)
                continue
            if not uid or uid in instances:
                rejected += 1  # a second file of the same SOP instance
                continue
            instances.add(uid)
            # a PatientID that names nobody makes the study its own subject (shared.subjects)
            pid = str(ds.get("PatientID", ""))
            patients.add(f"study:{ds.StudyInstanceUID}" if missing_patient_id(pid) else pid.strip())
            studies.add(str(ds.StudyInstanceUID))
            series.add(str(ds.SeriesInstanceUID))
    return {
        "files": files,
        "subjects": len(patients),
        "studies": len(studies),
        "series": len(series),
        "instances": len(instances),
        "rejected": rejected,
    }


@pytest.fixture(scope="module")
def api(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=60.0) as client:
        yield client


def create_cohort(api: httpx.Client, name: str, source: Path) -> dict[str, Any]:
    response = api.post(
        "/api/cohorts",
        json={"name": name, "source_path": str(source), "description": "extraction test", "owner": "tests",
              "tags": ["test"], "anonymization_enabled": False},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return dict(response.json())


def run_extraction(
    api: httpx.Client, cohort_id: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = api.post(
        f"/api/cohorts/{cohort_id}/stages/extraction/run", json={"config": config or {}}
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_progress(
    api: httpx.Client, job_id: str, at_least: int, timeout: float = 120.0
) -> dict[str, Any]:
    """The job once `at_least` items are done (or it ended)."""

    def probe() -> dict[str, Any] | None:
        job: dict[str, Any] = api.get(f"/api/jobs/{job_id}").json()
        done = (job.get("items_done") or 0) >= at_least
        return job if done or job["status"] in ("completed", "failed") else None

    return eventually_blocking(probe, timeout, 0.2, f"progress of job {job_id}")


async def catalog_counts(db_pool: asyncpg.Pool, cohort_id: str) -> dict[str, int]:
    row = await db_pool.fetchrow(
        """SELECT
            (SELECT count(*) FROM catalog.subject WHERE cohort_id = $1) AS subjects,
            (SELECT count(*) FROM catalog.study WHERE cohort_id = $1) AS studies,
            (SELECT count(*) FROM catalog.series WHERE cohort_id = $1) AS series,
            (SELECT count(*) FROM catalog.instance WHERE cohort_id = $1) AS instances,
            (SELECT count(DISTINCT sop_instance_uid) FROM catalog.instance WHERE cohort_id = $1) AS distinct_instances,
            (SELECT count(*) FROM catalog.rejected_file WHERE cohort_id = $1) AS rejected,
            (SELECT count(*) FROM catalog.source_file WHERE cohort_id = $1) AS files""",
        uuid.UUID(cohort_id),
    )
    return {k: int(v) for k, v in dict(row).items()}


@pytest.fixture(scope="module")
def all_data(tmp_path_factory: pytest.TempPathFactory, dicom_root: Path) -> Path:
    """Every shared set, plus a non-DICOM, a truncated and a corrupt file, by name-blind content."""
    root = link_tree(
        tmp_path_factory.mktemp("all") / "cohort", {p.name: p for p in dicom_root.iterdir()}
    )
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.dcm").write_text("this is a text file with a .dcm name\n")
    sample = next(
        p
        for p in (dicom_root / "dcm_qa_deident").rglob("*")
        if p.is_file() and p.stat().st_size > 4096
    )
    data = sample.read_bytes()
    (bad / "truncated").write_bytes(data[: len(data) // 3])
    corrupt = bytearray(data[:2048])
    corrupt[132:140] = b"\xff\xff\xff\xff\xff\xff\xff\xff"  # a broken element header after DICM
    (bad / "IM0001").write_bytes(bytes(corrupt))
    return root


async def test_extraction_counts_match_an_independent_pydicom_count(
    api: httpx.Client, db_pool: asyncpg.Pool, all_data: Path
) -> None:
    expected = independent_count(all_data)
    cohort = create_cohort(api, "extract-all", all_data)
    job = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"])
    assert job["status"] == "completed", job
    counts = await catalog_counts(db_pool, cohort["id"])
    assert counts["files"] == expected["files"]
    for key in ("subjects", "studies", "series", "instances", "rejected"):
        assert counts[key] == expected[key], (key, counts, expected)
    assert counts["instances"] == counts["distinct_instances"]

    reasons = {
        r["source_key"]: r["reason"]
        for r in await db_pool.fetch(
            "SELECT source_key, reason FROM catalog.rejected_file WHERE cohort_id = $1 AND source_key LIKE 'bad/%'",
            uuid.UUID(cohort["id"]),
        )
    }
    assert reasons["bad/notes.dcm"].startswith("not DICOM")
    assert reasons["bad/truncated"].startswith("truncated")
    assert set(reasons) == {"bad/notes.dcm", "bad/truncated", "bad/IM0001"}

    # the cohort's metrics came from the completion event
    cohort = api.get(f"/api/cohorts/{cohort['id']}").json()
    assert cohort["total_subjects"] == expected["subjects"]
    assert cohort["total_series"] == expected["series"]
    assert cohort["total_sessions"] == expected["studies"]

    # the catalog route lists every series with its stacks
    series = api.get(f"/api/cohorts/{cohort['id']}/series").json()
    assert len(series) == expected["series"]
    assert all(s["stacks"] for s in series if s["modality"] in ("MR", "CT"))
    keys = {st["stack_key"] for s in series for st in s["stacks"]}
    assert any(k.startswith("MR|TE=") and "ORIENT=" in k for k in keys)

    # a second run re-reads nothing already catalogued
    again = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"])
    assert again["status"] == "completed"
    assert again["items_total"] == 0
    assert (await catalog_counts(db_pool, cohort["id"])) == counts


async def test_sorting_before_extraction_is_refused(
    api: httpx.Client, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(tmp_path / "order", {"ct": dicom_root / "dcm_qa_ct"})
    cohort = create_cohort(api, "extract-order", source)
    response = api.post(f"/api/cohorts/{cohort['id']}/stages/sorting/run", json={"config": {}})
    assert response.status_code == 409
    assert "extraction" in response.json()["detail"]


async def test_deleting_a_cohort_removes_its_catalog_and_raw_zone(
    api: httpx.Client,
    tmp_path: Path,
    dicom_root: Path,
    db_pool: asyncpg.Pool,
    object_store: ObjectStore,
) -> None:
    """The raw zone holds identified copies: a deleted cohort must not leave them (or its catalog)
    behind. Another cohort of the same files keeps everything."""
    source = link_tree(tmp_path / "purge", {"ct": dicom_root / "dcm_qa_ct"})
    gone, kept = (create_cohort(api, f"extract-purge-{n}", source) for n in ("gone", "kept"))
    for cohort in (gone, kept):  # copied into the raw zone (ADR 0035)
        job = run_extraction(api, cohort["id"], {"copy_sources": True})
        assert wait_job_blocking(api, job["id"])["status"] == "completed"
    assert (await catalog_counts(db_pool, gone["id"]))["instances"] > 0
    assert any(object_store.list(f"raw/{gone['id']}/"))

    assert api.delete(f"/api/cohorts/{gone['id']}").status_code == 204
    deadline = time.monotonic() + 60
    while True:
        counts = await catalog_counts(db_pool, gone["id"])
        left = list(object_store.list(f"raw/{gone['id']}/"))
        if not any(counts.values()) and not left:
            break
        assert time.monotonic() < deadline, f"cohort not purged: {counts}, {len(left)} objects"
        await asyncio.sleep(0.5)
    runs = await db_pool.fetchval(
        "SELECT count(*) FROM catalog.runs WHERE cohort_id = $1", uuid.UUID(gone["id"])
    )
    assert runs == 0
    assert (await catalog_counts(db_pool, kept["id"]))["instances"] > 0
    assert any(object_store.list(f"raw/{kept['id']}/"))


async def test_a_file_changed_in_place_is_catalogued_anew(
    api: httpx.Client, tmp_path: Path, dicom_root: Path, db_pool: asyncpg.Pool
) -> None:
    """A file rewritten after extraction (same SOP instance, other bytes) is read again by the
    next run and its instance takes the new bytes: the catalog's SHA-256, header and details,
    which every in-place read is checked against (ADR 0035)."""
    source = tmp_path / "changed"
    source.mkdir()
    originals = sorted(p for p in (dicom_root / "dcm_qa_pdt2" / "In").rglob("*") if p.is_file())
    for i, path in enumerate(originals[:3]):
        (source / f"IM{i:04d}").write_bytes(path.read_bytes())
    cohort = create_cohort(api, f"extract-changed-{uuid.uuid4().hex[:6]}", source)
    assert wait_job_blocking(api, run_extraction(api, cohort["id"])["id"])["status"] == "completed"
    before = await catalog_counts(db_pool, cohort["id"])

    target = source / "IM0001"
    ds = pydicom.dcmread(target)
    ds.RepetitionTime = 1234.5
    ds.ImageComments = "rewritten in place"
    ds.save_as(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime, surely
    assert wait_job_blocking(api, run_extraction(api, cohort["id"])["id"])["status"] == "completed"

    row = await db_pool.fetchrow(
        "SELECT i.sha256, i.header::text AS header, d.repetition_time, i.object_key"
        " FROM catalog.instance i JOIN catalog.mr_detail d USING (cohort_id, sop_instance_uid)"
        " WHERE i.cohort_id = $1 AND i.source_key = 'IM0001'",
        uuid.UUID(cohort["id"]),
    )
    assert row["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert "rewritten in place" in row["header"]
    assert row["repetition_time"] == 1234.5
    assert row["object_key"] == "source:IM0001"
    assert await catalog_counts(db_pool, cohort["id"]) == before  # replaced, not added


async def test_cancel_mid_run_stops_the_work(
    api: httpx.Client, db_pool: asyncpg.Pool, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(
        tmp_path / "cancel",
        {"nih": dicom_root / "dcm_qa_nih", "deident": dicom_root / "dcm_qa_deident"},
    )
    cohort = create_cohort(api, "extract-cancel", source)
    job = run_extraction(api, cohort["id"], {"batch_files": 4, "process_pool_workers": 1})
    wait_progress(api, job["id"], at_least=1)
    response = api.post(f"/api/jobs/{job['id']}/cancel")
    assert response.status_code in (200, 202), response.text
    job = wait_job_blocking(api, job["id"])
    assert job["status"] == "cancelled"
    time.sleep(3)
    first = await catalog_counts(db_pool, cohort["id"])
    time.sleep(4)
    second = await catalog_counts(db_pool, cohort["id"])
    assert second == first, "work went on after cancel"
    assert first["files"] < independent_count(source)["files"]


async def test_a_killed_extractor_costs_time_not_data(
    api: httpx.Client, db_pool: asyncpg.Pool, stack: LocalStack, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(
        tmp_path / "kill", {"nih": dicom_root / "dcm_qa_nih", "fmap": dicom_root / "dcm_qa_fmap"}
    )
    expected = independent_count(source)
    cohort = create_cohort(api, "extract-kill", source)
    job = run_extraction(api, cohort["id"], {"batch_files": 8})
    wait_progress(api, job["id"], at_least=2)
    stack.kill_service("extractor")
    stack.start_service("extractor")
    job = wait_job_blocking(api, job["id"], timeout=600)
    assert job["status"] == "completed", job
    counts = await catalog_counts(db_pool, cohort["id"])
    assert counts["instances"] == counts["distinct_instances"] == expected["instances"]
    assert counts["files"] == expected["files"]


async def test_a_killed_service_takes_its_worker_processes_with_it(
    api: httpx.Client, stack: LocalStack, tmp_path: Path, dicom_root: Path
) -> None:
    """SIGKILL to the service alone (not its process group): its worker pool goes too, instead of
    living on adopted by init."""
    source = link_tree(tmp_path / "orphans", {"nih": dicom_root / "dcm_qa_nih"})
    cohort = create_cohort(api, "extract-orphans", source)
    job = run_extraction(api, cohort["id"], {"batch_files": 8})
    wait_progress(api, job["id"], at_least=1)
    pid = stack.status().services["extractor"].pid
    assert pid is not None
    family = [p for p in tree_pids(pid) if p != pid]
    assert family, "the extractor should have started its worker pool"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(processes.pid_alive(p) for p in family):
        left = [
            (p, Path(f"/proc/{p}/cmdline").read_bytes()[:120])
            for p in family
            if processes.pid_alive(p)
        ]
        assert time.monotonic() < deadline, f"worker processes outlived their service: {left}"
        time.sleep(0.2)
    stack.start_service("extractor")
    assert wait_job_blocking(api, job["id"], timeout=600)["status"] == "completed"


async def test_two_replicas_share_one_run_and_a_broker_restart_loses_nothing(
    api: httpx.Client, db_pool: asyncpg.Pool, stack: LocalStack, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(
        tmp_path / "replicas", {"nih": dicom_root / "dcm_qa_nih", "enh": dicom_root / "dcm_qa_enh"}
    )
    expected = independent_count(source)
    stack.start_service("extractor", replica=1)
    try:
        time.sleep(5)  # let the group rebalance over both members
        cohort = create_cohort(api, "extract-replicas", source)
        job = run_extraction(api, cohort["id"], {"batch_files": 8, "process_pool_workers": 1})
        wait_progress(api, job["id"], at_least=2)
        stack.restart_broker()
        job = wait_job_blocking(api, job["id"], timeout=600)
        assert job["status"] == "completed", job
        counts = await catalog_counts(db_pool, cohort["id"])
        assert counts["instances"] == counts["distinct_instances"] == expected["instances"]
        workers = await db_pool.fetchval(
            "SELECT count(DISTINCT worker) FROM catalog.run_items WHERE job_id = $1",
            uuid.UUID(job["id"]),
        )
        assert workers == 2, "both replicas should have processed items"
    finally:
        stack.stop_service("extractor-1")


def test_large_files_are_streamed_not_held_in_memory(
    object_store: ObjectStore, tmp_path: Path, dicom_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `LARGE_FILE_BYTES` a file is hashed and uploaded from disk and parsed from its path,
    and a zone object is downloaded to a scratch file first: the outcomes are the same as for the
    in-memory route, the raw objects are the files, and no scratch file is left behind."""
    from services.extractor import worker as extractor_files

    source = link_tree(tmp_path / "large", {"ct": dicom_root / "dcm_qa_ct"})
    paths = [Path(d) / n for d, _, names in os.walk(source, followlinks=True) for n in names]
    listed = sorted(
        (str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths
    )[:12]
    assert listed
    tag = uuid.uuid4().hex[:8]

    def run(location: str, ingest: str | None) -> list[tuple[Any, ...]]:
        outcomes = extractor_files.extract_batch(
            extractor_files.FileBatch(location, ingest, listed, 2)
        )
        return [(o.key, o.sha256, o.rejection, o.row_json, o.header_json) for o in outcomes]

    in_memory = run(str(source), f"raw/{tag}-memory")
    monkeypatch.setattr(extractor_files, "LARGE_FILE_BYTES", 0)
    scratch_before = set(Path(tempfile.gettempdir()).glob("cohortflow-extract-*"))
    streamed = run(str(source), f"raw/{tag}-streamed")
    from_zone = run(f"zone:raw/{tag}-streamed", None)
    assert streamed == in_memory
    assert from_zone == in_memory
    assert any(row[3] is not None for row in in_memory), "nothing catalogued"
    for key, digest, *_ in streamed:
        info = object_store.stat(f"raw/{tag}-streamed/{key}")
        assert info is not None and info.sha256 == digest
        assert info.size == (source / key).stat().st_size
    first = listed[0][0]
    assert object_store.get_bytes(f"raw/{tag}-streamed/{first}") == (source / first).read_bytes()
    assert set(Path(tempfile.gettempdir()).glob("cohortflow-extract-*")) == scratch_before
