"""Hostile sources and the one-way anonymization, against the real stack.

Each probe of the hardening pass (ADR 0017) is a test here: a link to /etc inside a data root, `s3://` sources in the
system's own buckets (another cohort's raw zone, the audit and broker buckets), switching an
anonymized cohort back, a file name that is not UTF-8, a self-referencing link, a FIFO and a
dangling link. Every refused entry is recorded with its reason while the run completes; nothing
that is not DICOM reaches the raw zone; no identified instance reaches an anonymized cohort's
catalog through PATCH, stage runs, new-study notices or `s3://` sources.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest

from shared.settings import BROKER_BUCKET, Settings
from shared.sources import read_catalogued
from shared.storage import ObjectStore
from tests.integration.polling import wait_job_blocking
from tests.integration.test_extraction import (
    create_cohort,
    independent_count,
    link_tree,
    run_extraction,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.stack_services("gateway", "extractor", "anonymizer"),
]

ANON_CONFIG: dict[str, Any] = {
    "patient_id": {"strategy": "hash"},
    "audit_export": {"format": "encrypted_excel", "password": "audit-password-4-source-tests"},
}


@pytest.fixture(scope="module")
def api(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=60.0) as client:
        yield client


def dicom_files(folder: Path) -> list[Path]:
    """The files below `folder` (links followed) that pydicom reads as DICOM."""
    found = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in sorted(names):
            path = Path(dirpath) / name
            try:
                pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            found.append(path)
    return found


async def rejected(db_pool: asyncpg.Pool, cohort_id: str) -> dict[str, str]:
    rows = await db_pool.fetch(
        "SELECT source_key, reason FROM catalog.rejected_file WHERE cohort_id = $1",
        uuid.UUID(cohort_id),
    )
    return {r["source_key"]: r["reason"] for r in rows}


async def catalogued(db_pool: asyncpg.Pool, cohort_id: str) -> list[asyncpg.Record]:
    return list(
        await db_pool.fetch(
            "SELECT source_key, object_key, sha256, sop_instance_uid, header::text AS header"
            " FROM catalog.instance WHERE cohort_id = $1",
            uuid.UUID(cohort_id),
        )
    )


# --- probe 1: a link out of the data root; non-DICOM never reaches object storage ---------------


async def test_a_link_to_etc_is_rejected_and_never_read(
    api: httpx.Client,
    db_pool: asyncpg.Pool,
    object_store: ObjectStore,
    tmp_path: Path,
    dicom_root: Path,
    stack_settings: Settings,
) -> None:
    source = link_tree(tmp_path / "etc-link", {"ct": dicom_root / "dcm_qa_ct" / "In"})
    (source / "etc").symlink_to("/etc", target_is_directory=True)
    (source / "shadow").symlink_to("/etc/shadow")
    (source / "state").symlink_to(stack_settings.home, target_is_directory=True)
    (source / "notes.txt").write_text("not DICOM: must never be copied into the raw zone\n")
    cohort = create_cohort(api, f"src-etc-{uuid.uuid4().hex[:6]}", source)
    # copied into the raw zone (ADR 0035): what is copied is what this probe checks
    job = wait_job_blocking(api, run_extraction(api, cohort["id"], {"copy_sources": True})["id"])
    assert job["status"] == "completed", job

    reasons = await rejected(db_pool, cohort["id"])
    assert reasons["etc"] == "a link that leads outside the allowed data roots"
    assert reasons["shadow"] == "a link that leads outside the allowed data roots"
    assert (
        reasons["state"]
        == "a link that leads inside the system's own state folder (COHORTFLOW_HOME)"
    )
    assert reasons["notes.txt"].startswith("not DICOM")
    assert not any(k.startswith(("etc/", "state/")) for k in reasons)  # never walked

    raw = {
        o.key.removeprefix(f"raw/{cohort['id']}/")
        for o in object_store.list(f"raw/{cohort['id']}/")
    }
    expected = {
        p.relative_to(dicom_root / "dcm_qa_ct" / "In").as_posix()
        for p in dicom_files(dicom_root / "dcm_qa_ct" / "In")
    }
    assert raw == {f"ct/{k}" for k in expected}  # only what sniffs as DICOM, nothing from /etc
    instances = await catalogued(db_pool, cohort["id"])
    assert len(instances) == len(expected)


async def test_links_as_the_source_itself_are_resolved_first(
    api: httpx.Client, tmp_path: Path, dicom_root: Path, stack_settings: Settings
) -> None:
    # a link to /etc, or into the stack's own state (its S3 server's and Postgres' files), named
    # as the source: refused when the cohort is created
    (tmp_path / "etc").symlink_to("/etc", target_is_directory=True)
    (tmp_path / "state").symlink_to(stack_settings.home, target_is_directory=True)
    for path, message in [
        (tmp_path / "etc", "outside the allowed data roots"),
        (tmp_path / "state", "own state folder"),
        (stack_settings.home, "own state folder"),
    ]:
        r = api.post(
            "/api/cohorts",
            json={"name": f"src-as-link-{uuid.uuid4().hex[:6]}", "source_path": str(path)},
        )
        assert r.status_code == 422, r.text
        assert message in r.json()["detail"], r.text


async def test_a_source_swapped_for_a_link_after_creation_fails_its_plan_with_the_reason(
    api: httpx.Client, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(tmp_path / "swapped", {"ct": dicom_root / "dcm_qa_ct" / "In"})
    cohort = create_cohort(api, f"src-swapped-{uuid.uuid4().hex[:6]}", source)
    (source / "ct").unlink()
    source.rmdir()
    source.symlink_to("/etc", target_is_directory=True)
    job = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"], timeout=60)
    assert job["status"] == "failed", job
    assert "outside the allowed data roots" in (job["status_reason"] or ""), job


# --- probes 5 and 6: odd names and entries that are not files ---------------------------------


async def test_hostile_entries_are_recorded_while_the_run_goes_on(
    api: httpx.Client,
    db_pool: asyncpg.Pool,
    object_store: ObjectStore,
    tmp_path: Path,
    dicom_root: Path,
    stack_settings: Settings,
) -> None:
    source = link_tree(tmp_path / "hostile", {"enh": dicom_root / "dcm_qa_enh" / "In"})
    sample = dicom_files(dicom_root / "dcm_qa_ct" / "In")[0]
    odd = os.fsencode(source) + b"/scan-\xff\xfe-caf\xe9.dcm"  # Latin-1, not UTF-8
    with open(odd, "wb") as fh:
        fh.write(sample.read_bytes())
    (source / "self").symlink_to(source / "self")
    (source / "dangling").symlink_to(source / "no-such-file")
    (source / "loop").symlink_to(source, target_is_directory=True)
    os.mkfifo(source / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(source / "socket"))
    sock.close()

    cohort = create_cohort(api, f"src-hostile-{uuid.uuid4().hex[:6]}", source)
    job = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"], timeout=120)
    assert job["status"] == "completed", job

    reasons = await rejected(db_pool, cohort["id"])
    assert reasons["self"] == "a link that loops (it leads back to itself)"
    assert reasons["dangling"] == "a dangling link (its target does not exist)"
    assert reasons["loop"] == "a link to one of its own parent folders (it would loop)"
    assert reasons["fifo"] == "not a regular file: a FIFO (named pipe)"
    assert reasons["socket"] == "not a regular file: a socket"

    # the odd name is catalogued in place under a lossless escaped key, which reads the file back
    # (ADR 0035); nothing was copied into the raw zone
    key = "scan-%FF%FE-caf%E9.dcm"
    rows = {r["source_key"]: r for r in await catalogued(db_pool, cohort["id"])}
    assert key in rows, sorted(rows)
    assert rows[key]["object_key"] == f"source:{key}"
    read = read_catalogued(
        object_store, rows[key]["object_key"], rows[key]["sha256"], str(source), stack_settings
    )
    assert read == sample.read_bytes()
    assert not any(object_store.list(f"raw/{cohort['id']}/"))
    expected = independent_count(dicom_root / "dcm_qa_enh" / "In")["instances"] + 1
    assert len(rows) == expected

    # a second run re-reads nothing and still records nothing twice
    again = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"], timeout=120)
    assert again["status"] == "completed", again
    assert len(await catalogued(db_pool, cohort["id"])) == expected


async def test_the_anonymizer_plans_around_hostile_entries(
    api: httpx.Client, db_pool: asyncpg.Pool, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(tmp_path / "anon-hostile", {"enh": dicom_root / "dcm_qa_enh" / "In"})
    sample = dicom_files(dicom_root / "dcm_qa_ct" / "In")[0]
    with open(os.fsencode(source) + b"/\xff-odd.dcm", "wb") as fh:
        fh.write(sample.read_bytes())
    (source / "self").symlink_to(source / "self")
    (source / "etc").symlink_to("/etc", target_is_directory=True)
    os.mkfifo(source / "fifo")
    cohort = create_anonymized(api, "src-anon-hostile", source)
    job = run_stage(api, cohort["id"], "anonymization", ANON_CONFIG)
    assert job["status"] == "completed", job
    reasons = {
        r["reason"]
        for r in await db_pool.fetch(
            "SELECT rejection AS reason FROM anonymizer.source_file"
            " WHERE cohort_id = $1 AND rejection IS NOT NULL",
            uuid.UUID(cohort["id"]),
        )
    }
    assert {
        "a link that loops (it leads back to itself)",
        "a link that leads outside the allowed data roots",
        "not a regular file: a FIFO (named pipe)",
    } <= reasons
    extraction = run_stage(api, cohort["id"], "extraction", {})
    assert extraction["status"] == "completed", extraction
    originals = {str(pydicom.dcmread(sample).SOPInstanceUID)}
    originals |= {str(pydicom.dcmread(p).SOPInstanceUID) for p in dicom_files(source / "enh")}
    rows = await catalogued(db_pool, cohort["id"])
    assert len(rows) == len(originals)  # the odd name was anonymized too
    assert not originals & {r["sop_instance_uid"] for r in rows}


# --- probe 2: s3:// sources ----------------------------------------------------------------------


async def test_s3_sources_in_the_systems_own_buckets_are_refused(
    api: httpx.Client, tmp_path: Path, dicom_root: Path
) -> None:
    victim = create_cohort(
        api,
        f"src-victim-{uuid.uuid4().hex[:6]}",
        link_tree(tmp_path / "v", {"ct": dicom_root / "dcm_qa_ct" / "In"}),
    )
    job = wait_job_blocking(api, run_extraction(api, victim["id"])["id"])
    assert job["status"] == "completed", job
    own = [
        f"s3://cohortflow/raw/{victim['id']}",
        "s3://cohortflow",
        f"s3://cohortflow/anon/{victim['id']}",
        "s3://cohortflow-audit",
        f"s3://{BROKER_BUCKET}",
    ]
    for location in own:
        r = api.post(
            "/api/cohorts",
            json={"name": f"src-thief-{uuid.uuid4().hex[:6]}", "source_path": location},
        )
        assert r.status_code == 422, (location, r.text)
        assert "system's own buckets" in r.json()["detail"], r.text
        # nor through a PATCH of an existing cohort, nor a new-study notice naming one
        p = api.patch(f"/api/cohorts/{victim['id']}", json={"source_path": location})
        assert p.status_code == 422, (location, p.text)
        s = api.post(
            "/api/studies",
            json={"study_instance_uid": "1.2.3", "location": location, "cohort": victim["id"]},
        )
        assert s.status_code == 422, (location, s.text)
    # a bucket nobody configured is refused too; a configured one (COHORTFLOW_S3_SOURCES) is not
    r = api.post(
        "/api/cohorts",
        json={"name": f"src-unlisted-{uuid.uuid4().hex[:6]}", "source_path": "s3://some-bucket/x"},
    )
    assert r.status_code == 422 and "not under an allowed S3 source" in r.json()["detail"]
    r = api.post(
        "/api/cohorts",
        json={
            "name": f"src-listed-{uuid.uuid4().hex[:6]}",
            "source_path": "s3://cohortflow-test-sources/x",
        },
    )
    assert r.status_code == 201, r.text


# --- probe 3: anonymization is one-way; no identified instance reaches an anonymized catalog ----


def create_anonymized(api: httpx.Client, name: str, source: Path | str) -> dict[str, Any]:
    r = api.post(
        "/api/cohorts",
        json={"name": f"{name}-{uuid.uuid4().hex[:6]}", "source_path": str(source), "anonymization_enabled": True},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return dict(r.json())


def run_stage(
    api: httpx.Client, cohort_id: str, stage: str, config: dict[str, Any]
) -> dict[str, Any]:
    r = api.post(f"/api/cohorts/{cohort_id}/stages/{stage}/run", json={"config": config})
    assert r.status_code == 202, r.text
    return wait_job_blocking(api, r.json()["id"], timeout=300)


async def test_no_route_brings_identified_instances_into_an_anonymized_catalog(
    api: httpx.Client, db_pool: asyncpg.Pool, tmp_path: Path, dicom_root: Path
) -> None:
    source = link_tree(tmp_path / "anon", {"enh": dicom_root / "dcm_qa_enh" / "In"})
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(source)]
    original_uids = {str(ds.SOPInstanceUID) for ds in originals}
    patient_ids = {str(ds.PatientID) for ds in originals if len(str(ds.get("PatientID", ""))) > 2}
    cohort = create_anonymized(api, "src-anon", source)
    cid = cohort["id"]

    async def assert_only_deidentified(expect: int) -> None:
        rows = await catalogued(db_pool, cid)
        assert len(rows) == expect
        assert all(r["object_key"].startswith(f"anon/{cid}/") for r in rows), rows[:3]
        assert not original_uids & {r["sop_instance_uid"] for r in rows}
        for r in rows:
            assert not any(pid in r["header"] for pid in patient_ids)

    assert run_stage(api, cid, "anonymization", ANON_CONFIG)["status"] == "completed"
    # stage run: extraction reads the de-identified zone, never the source
    assert run_stage(api, cid, "extraction", {})["status"] == "completed"
    await assert_only_deidentified(len(original_uids))

    # PATCH back: refused with the reason, the cohort unchanged
    r = api.patch(f"/api/cohorts/{cid}", json={"anonymization_enabled": False})
    assert r.status_code == 409, r.text
    assert "anonymization cannot be turned off" in r.json()["detail"]
    assert "new cohort" in r.json()["detail"]
    assert api.get(f"/api/cohorts/{cid}").json()["anonymization_enabled"] is True

    # the same the other way: an identified catalog cannot be turned into an anonymized one
    plain = create_cohort(api, f"src-plain-{uuid.uuid4().hex[:6]}", source)
    assert wait_job_blocking(api, run_extraction(api, plain["id"])["id"])["status"] == "completed"
    r = api.patch(f"/api/cohorts/{plain['id']}", json={"anonymization_enabled": True})
    assert r.status_code == 409 and "cannot be turned on" in r.json()["detail"], r.text

    # s3://: another cohort's identified raw zone cannot become this cohort's source
    r = api.patch(f"/api/cohorts/{cid}", json={"source_path": f"s3://cohortflow/raw/{plain['id']}"})
    assert r.status_code == 422, r.text

    # a new-study notice pointing at the identified folder: its run anonymizes first
    study_uid = str(originals[0].StudyInstanceUID)
    r = api.post(
        "/api/studies",
        json={
            "study_instance_uid": study_uid,
            "location": str(source / "enh"),
            "cohort": cid,
            "complete": True,
        },
    )
    assert r.status_code == 202, r.text
    jobs = {j["stage"]: j for j in r.json()["jobs"]}
    assert list(jobs)[:2] == ["anonymization", "extraction"]
    for stage in ("anonymization", "extraction"):
        assert wait_job_blocking(api, jobs[stage]["id"])["status"] == "completed"
    for stage in ("sorting", "export"):  # no sorter or exporter runs in this module
        api.post(f"/api/jobs/{jobs[stage]['id']}/cancel")
    await assert_only_deidentified(len(original_uids))

    # a stage run after all that: still only the de-identified zone
    assert run_stage(api, cid, "extraction", {})["status"] == "completed"
    await assert_only_deidentified(len(original_uids))

    # the CLI reusing the cohort by name without --anonymize refuses instead of running it plain
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow.cli", "run", str(source), "--name", cohort["name"]],
        env={**os.environ, "COHORTFLOW_GATEWAY_URL": str(api.base_url).rstrip("/")},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    assert "exists with anonymization enabled" in done.stdout + done.stderr


async def test_new_studies_with_the_same_file_names_do_not_collide(
    api: httpx.Client,
    db_pool: asyncpg.Pool,
    object_store: ObjectStore,
    tmp_path: Path,
    dicom_root: Path,
    stack_settings: Settings,
) -> None:
    """Three studies announced one by one, each holding a file named IM0001 (two inside the
    cohort's folder, one outside it): each is catalogued under its own key."""
    samples = [
        dicom_files(dicom_root / name / "In")[0]
        for name in ("dcm_qa_ct", "dcm_qa_enh", "dcm_qa_nih")
    ]
    incoming = tmp_path / "incoming"
    folders = [incoming / "study-1", incoming / "study-2", tmp_path / "elsewhere" / "study-3"]
    for folder, sample in zip(folders, samples, strict=True):
        folder.mkdir(parents=True)
        (folder / "IM0001").write_bytes(sample.read_bytes())
    cohort = create_cohort(api, f"src-studies-{uuid.uuid4().hex[:6]}", incoming)
    for folder, sample in zip(folders, samples, strict=True):
        uid = str(pydicom.dcmread(sample, stop_before_pixels=True).StudyInstanceUID)
        body = {"study_instance_uid": uid, "location": str(folder), "cohort": cohort["id"],
                "complete": True}  # fmt: skip
        r = api.post("/api/studies", json=body)
        assert r.status_code == 202, r.text
        jobs = {j["stage"]: j for j in r.json()["jobs"]}
        assert (
            wait_job_blocking(api, jobs["extraction"]["id"], timeout=120)["status"] == "completed"
        )
        for stage in ("sorting", "export"):  # no sorter or exporter runs in this module
            api.post(f"/api/jobs/{jobs[stage]['id']}/cancel")

    rows = {r["source_key"]: r for r in await catalogued(db_pool, cohort["id"])}
    assert {"study-1/IM0001", "study-2/IM0001"} <= set(rows), sorted(rows)
    [outside] = [k for k in rows if k.startswith("@")]
    assert outside.endswith("/IM0001") and len(rows) == 3
    # inside the cohort's folder catalogued in place, outside it copied (ADR 0035)
    assert rows["study-1/IM0001"]["object_key"] == "source:study-1/IM0001"
    assert rows[outside]["object_key"] == f"raw/{cohort['id']}/{outside}"
    for key, sample in zip(["study-1/IM0001", "study-2/IM0001", outside], samples, strict=True):
        row = rows[key]
        read = read_catalogued(
            object_store, row["object_key"], row["sha256"], str(incoming), stack_settings
        )
        assert read == sample.read_bytes()
    # a whole-cohort run afterwards names the inside studies' files as they were: nothing new
    job = wait_job_blocking(api, run_extraction(api, cohort["id"])["id"], timeout=120)
    assert job["status"] == "completed", job
    assert {r["source_key"] for r in await catalogued(db_pool, cohort["id"])} == set(rows)
