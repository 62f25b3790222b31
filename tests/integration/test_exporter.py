"""The exporter in the real pipeline: real DICOM through the gateway, extractor, sorter and exporter
on the local stack (Postgres, Kafka protocol broker, S3), checked from the outside.

The cohort points at a temporary folder of symlinks into the team's QA sets (PD+T2, Siemens GRE
field maps, Siemens EPI with four phase-encoding directions, a Philips DTI): nothing is
copied into the project. The export is downloaded file by file through the gateway, as
`cohortflow run --out DIR` does, and must be a complete, validator-clean BIDS tree whose images equal
dcm2niix's reference outputs in the sets' `Ref/` folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nibabel as nib
import numpy as np
import pytest
import pytest_asyncio

from cohortflow.stack import LocalStack
from services.exporter.plugin import ExporterPlugin
from services.exporter.validate import run_bids_validator
from shared.db import create_pool
from shared.events import CohortRef, WorkItem
from shared.settings import Settings
from shared.stage import ItemContext
from shared.storage import ObjectStore
from shared.topics import Stage
from tests.integration.polling import wait_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.stack_services("gateway", "extractor", "sorter", "exporter"),
]

# folder in the cohort -> folder of the QA set
SETS = {
    "pdt2": "dcm_qa_pdt2/In/Siemens/VE11",
    "fmap2": "dcm_qa_fmap/In/Siemens/2_gre_field_magph",
    "fmap3": "dcm_qa_fmap/In/Siemens/3_gre_field_magph",
    "epi": "dcm_qa_nih/In/20180918Si",
    "dti": "dcm_qa_philips_dwi/In/cl",
}
EXPORT = {"outputModes": ["nii.gz", "dcm"]}
JOB_TIMEOUT_S = 900.0


def link_sets(dicom_root: Path, folder: Path, sets: dict[str, str] | None = None) -> Path:
    """A cohort folder of hard links to the QA files of `sets` (folder in the cohort -> folder of
    the QA set; default `SETS`), a temporary copy where links are refused.

    Symlinks will not do: the source refuses files that resolve outside the cohort's folder."""
    for name, relative in (SETS if sets is None else sets).items():
        source = dicom_root / relative
        for path in sorted(source.rglob("*")):
            if path.is_file():
                target = folder / name / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copyfile(path, target)
    return folder


async def run_export(
    api: httpx.AsyncClient, cohort_id: str, config: dict[str, Any]
) -> dict[str, Any]:
    response = await api.post(
        f"/api/cohorts/{cohort_id}/stages/export/run", json={"config": config}
    )
    assert response.status_code == 202, response.text
    job = await wait_job(api, response.json()["id"], JOB_TIMEOUT_S)
    assert job["status"] == "completed", job
    return job


async def manifest(api: httpx.AsyncClient, cohort_id: str, job_id: str) -> list[dict[str, Any]]:
    listing = (await api.get(f"/api/cohorts/{cohort_id}/exports/{job_id}")).json()
    files: list[dict[str, Any]] = listing["files"]
    return files


async def download_tree(api: httpx.AsyncClient, files: list[dict[str, Any]], root: Path) -> Path:
    """Every listed file through the gateway's download route, checked against its SHA-256."""
    for entry in files:
        response = await api.get(entry["download_url"])
        assert response.status_code == 200, (entry["path"], response.text)
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"], entry["path"]
        target = root / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.content)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60.0) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def exported(
    api: httpx.AsyncClient, dicom_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A cohort run through extraction, sorting and export (NIfTI + DICOM), and its export tree."""
    source = link_sets(dicom_root, tmp_path_factory.mktemp("cohort-source"))
    body = {"name": f"export-it-{uuid.uuid4().hex[:8]}", "source_path": str(source)}
    created = await api.post("/api/cohorts", json=body)
    assert created.status_code == 201, created.text
    cohort = created.json()
    run = await api.post(
        f"/api/cohorts/{cohort['id']}/pipeline", json={"sorting": {}, "export": EXPORT}
    )
    assert run.status_code == 202, run.text
    jobs = {j["stage"]: j for j in run.json()["jobs"]}
    for stage in ("extraction", "sorting", "export"):
        jobs[stage] = await wait_job(api, jobs[stage]["id"], JOB_TIMEOUT_S)
        assert jobs[stage]["status"] == "completed", json.dumps(jobs[stage], indent=1)[:4000]
    files = await manifest(api, cohort["id"], jobs["export"]["id"])
    tree = await download_tree(api, files, tmp_path_factory.mktemp("export-tree"))
    return {"cohort": cohort, "jobs": jobs, "files": files, "tree": tree}


# the dcm2niix outputs in the sets' Ref/ folders that the cohort's stacks must reproduce
REFERENCES = [
    "dcm_qa_pdt2/Ref/Siemens_pd+t2_tse_sag_ISO_1.8mm_3_e1",
    "dcm_qa_pdt2/Ref/Siemens_pd+t2_tse_sag_ISO_1.8mm_3_e2",
    "dcm_qa_fmap/Ref/Si_2_gre_field_magph_e1",
    "dcm_qa_fmap/Ref/Si_2_gre_field_magph_e2",
    "dcm_qa_fmap/Ref/Si_3_gre_field_magph_e2_ph",
    "dcm_qa_nih/Ref/EPI_PE=AP_3",
    "dcm_qa_nih/Ref/EPI_PE=PA_4",
    "dcm_qa_nih/Ref/EPI_PE=RL_5",
    "dcm_qa_nih/Ref/EPI_PE=LR_6",
    "dcm_qa_philips_dwi/Ref/701_DTI_Biobank_2mm_MB3S2_EPI_cl",
]


def image_identity(sidecar: dict[str, Any]) -> tuple[Any, ...]:
    """What tells the images of these sets apart: series, echo, and phase or magnitude."""
    phase = "P" in sidecar.get("ImageType", []) or "PHASE" in sidecar.get("ImageType", [])
    return (
        sidecar.get("SeriesDescription"),
        sidecar.get("SeriesNumber"),
        round(float(sidecar.get("EchoTime", 0.0)), 5),
        phase,
    )


def raw_images(files: list[dict[str, Any]]) -> list[str]:
    return [
        f["path"]
        for f in files
        if f["kind"] == "nifti" and not f["path"].startswith(("sourcedata/", "derivatives/"))
    ]


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def test_export_is_a_complete_valid_bids_tree(exported: dict[str, Any]) -> None:
    job, files, tree = exported["jobs"]["export"], exported["files"], exported["tree"]
    summary = job["summary"]
    assert summary["validator"]["errors"] == 0, summary["validator"]["error_codes"]
    assert summary["validator"]["valid"] is True and summary["failed_stacks"] == []
    assert summary["not_exported"] == {} and summary["review_required_exported"] == 0
    assert job["items_failed"] == 0 and job["items_total"] == summary["stacks_with_output"] == 10
    assert summary["output_prefix"] == f"export/{exported['cohort']['id']}/{job['id']}"
    # finalize wrote the dataset-level files only: no sidecar was rewritten with other bytes
    assert summary["dataset_files_written"] == sum(1 for f in files if f["kind"] == "metadata")

    paths = {f["path"] for f in files}
    subjects = sorted(p.split("/")[0] for p in paths if p.startswith("sub-") and p.count("/") == 1)
    assert len(subjects) == 4
    for dataset_file in ("dataset_description.json", "participants.tsv", "participants.json",
                         "README", ".bidsignore"):  # fmt: skip
        assert dataset_file in paths
    for subject in subjects:
        assert f"{subject}/{subject}_sessions.tsv" in paths
        assert any(p.startswith(f"{subject}/ses-") and p.endswith("_scans.tsv") for p in paths)
    participants = (tree / "participants.tsv").read_text().splitlines()
    assert sorted(row.split("\t")[0] for row in participants[1:]) == subjects
    generated = {
        g["Name"]: g["Version"] for g in read_json(tree / "dataset_description.json")["GeneratedBy"]
    }
    assert generated["dcm2niix"].startswith("v1.0.") and "Cohortflow" in generated

    # the tree as `cohortflow run --out` gets it (every listed file, sourcedata too) is valid
    report = run_bids_validator(tree)
    assert report.errors == 0, [
        (i.code, i.location) for i in report.issues if i.severity == "error"
    ]
    assert sorted(f"sub-{s}" for s in report.summary["subjects"]) == subjects
    assert set(report.summary["dataTypes"]) == {"anat", "fmap", "func", "dwi"}
    on_disk = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    assert on_disk == paths


async def test_images_equal_dcm2niix_reference(exported: dict[str, Any], dicom_root: Path) -> None:
    tree = exported["tree"]
    ours: dict[tuple[Any, ...], str] = {}
    for path in raw_images(exported["files"]):
        sidecar = read_json(tree / (path.removesuffix(".gz").removesuffix(".nii") + ".json"))
        identity = image_identity(sidecar)
        assert identity not in ours, f"{path} and {ours.get(identity)} are the same image"
        ours[identity] = path
    assert len(ours) == len(REFERENCES)
    compared = 0
    for reference in REFERENCES:
        ref = dicom_root / reference
        path = ours[image_identity(read_json(Path(f"{ref}.json")))]
        image = nib.load(tree / path)
        assert isinstance(image, nib.Nifti1Image)
        if Path(f"{ref}.nii").exists():
            expected = nib.load(f"{ref}.nii")
            assert isinstance(expected, nib.Nifti1Image)
            assert image.shape == expected.shape, path
            assert np.allclose(image.affine, expected.affine, atol=1e-4), path
            assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(expected.dataobj)), (
                path
            )
            compared += 1
        if Path(f"{ref}.bval").exists():
            stem = tree / path.removesuffix(".nii.gz")
            bval = np.loadtxt(f"{stem}.bval")
            assert np.allclose(bval, np.loadtxt(f"{ref}.bval")), path
            assert np.allclose(np.loadtxt(f"{stem}.bvec"), np.loadtxt(f"{ref}.bvec"), atol=1e-4)
            assert image.shape[3] == bval.size
            compared += 1
    assert compared == len(REFERENCES)


async def test_dicom_mode_copies_every_selected_instance_once(
    exported: dict[str, Any], db_pool: asyncpg.Pool
) -> None:
    files = exported["files"]
    copies = [f for f in files if f["kind"] == "dicom"]
    assert all(f["path"].startswith("sourcedata/dicom/") for f in copies)
    copied = Counter(uid for f in copies for uid in f["source_sop_instance_uids"])
    assert set(copied.values()) == {1} and all(
        len(f["source_sop_instance_uids"]) == 1 for f in copies
    )
    selected = {uid for f in files if f["kind"] == "nifti" for uid in f["source_sop_instance_uids"]}
    assert set(copied) == selected
    catalog = {
        r["sop_instance_uid"]: r["sha256"]
        for r in await db_pool.fetch(
            "SELECT sop_instance_uid, sha256 FROM catalog.instance_v WHERE cohort_id = $1",
            uuid.UUID(exported["cohort"]["id"]),
        )
    }
    assert set(copied) == set(catalog)  # every stack is selected here: every instance, once
    for f in copies:
        assert f["sha256"] == catalog[f["source_sop_instance_uids"][0]], f["path"]


async def test_intent_filter_and_destination(
    exported: dict[str, Any], api: httpx.AsyncClient, tmp_path: Path
) -> None:
    cohort_id = exported["cohort"]["id"]
    destination = tmp_path / "export-copy"
    job = await run_export(
        api,
        cohort_id,
        {
            "outputModes": ["nii"],
            "includeIntents": ["anat", "fmap"],
            "destination": str(destination),
        },
    )
    files = await manifest(api, cohort_id, job["id"])
    images = raw_images(files)
    assert all(p.split("/")[-2] in ("anat", "fmap") for p in images)
    assert all(p.endswith(".nii") for p in images) and not any(f["kind"] == "dicom" for f in files)
    # exactly the stacks the sorter gave those intents (the catalog API says which)
    stacks = {
        (series["series_instance_uid"], stack["stack_key"]): stack["intent"]
        for series in (await api.get(f"/api/cohorts/{cohort_id}/series")).json()
        for stack in series["stacks"]
    }
    exported_stacks = {
        (f["series_instance_uid"], f["stack_key"]) for f in files if f["kind"] == "nifti"
    }
    assert exported_stacks == {k for k, intent in stacks.items() if intent in ("anat", "fmap")}
    left_out = Counter(i for i in stacks.values() if i not in ("anat", "fmap"))
    assert left_out and set(left_out) <= {"func", "dwi", "perf"}
    summary = job["summary"]
    assert summary["not_exported"] == {
        f"intent {intent} not in includeIntents": n for intent, n in left_out.items()
    }
    assert summary["validator"]["errors"] == 0
    copied = {p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file()}
    assert copied == {f["path"] for f in files}


async def test_flat_layout_copied_to_s3(
    exported: dict[str, Any], api: httpx.AsyncClient, object_store: ObjectStore
) -> None:
    cohort_id = exported["cohort"]["id"]
    bucket = f"dest-{uuid.uuid4().hex[:12]}"
    object_store.client.make_bucket(bucket)
    config = {
        "layout": "flat",
        "outputModes": ["nii.gz", "dcm"],
        "includeIntents": ["fmap"],
        "destination": f"s3://{bucket}/study/flat",
    }
    job = await run_export(api, cohort_id, config)
    files = await manifest(api, cohort_id, job["id"])
    copied = {o.key.removeprefix("study/flat/") for o in object_store.list("study/", bucket=bucket)}
    assert copied == {f["path"] for f in files}
    images = [f["path"] for f in files if f["kind"] == "nifti"]
    assert len(images) == 3 and all("/" not in p for p in images)
    copies = [f["path"] for f in files if f["kind"] == "dicom"]
    folders = {p.split("/")[0] for p in copies}
    assert folders == {p.removesuffix(".nii.gz") for p in images}
    assert {"dataset_description.json", "README"} <= {f["path"] for f in files}
    assert job["summary"]["validator"] == {"skipped": "flat layout is not a BIDS dataset"}


async def test_a_cohort_sharing_the_same_files_exports_only_its_own(
    exported: dict[str, Any],
    api: httpx.AsyncClient,
    object_store: ObjectStore,
    dicom_root: Path,
    tmp_path: Path,
) -> None:
    """Same SOP Instance UIDs in two cohorts: each export reads its own cohort's catalog only."""
    folder = tmp_path / "pdt2-only"
    for path in sorted((dicom_root / SETS["pdt2"]).iterdir()):
        folder.mkdir(exist_ok=True)
        os.link(path, folder / path.name)
    body = {"name": f"export-it-pdt2-{uuid.uuid4().hex[:8]}", "source_path": str(folder)}
    cohort = (await api.post("/api/cohorts", json=body)).json()
    run = await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={"export": EXPORT})
    assert run.status_code == 202, run.text
    export_job = await wait_job(api, run.json()["jobs"][-1]["id"], JOB_TIMEOUT_S)
    assert export_job["status"] == "completed", export_job
    files = await manifest(api, cohort["id"], export_job["id"])
    images = raw_images(files)
    assert len(images) == 2 and all(p.split("/")[-2] == "anat" for p in images)
    ours = {uid for f in files if f["kind"] == "dicom" for uid in f["source_sop_instance_uids"]}
    theirs = {
        uid
        for f in exported["files"]
        if f["kind"] == "dicom"
        for uid in f["source_sop_instance_uids"]
    }
    assert len(ours) == 70 and ours < theirs
    # nothing is borrowed from the other cohort's export: every file was written for this one
    written = list(object_store.list(f"export/{cohort['id']}/{export_job['id']}/"))
    assert len(written) == len(files)


async def test_second_export_with_skip_writes_nothing_new(
    exported: dict[str, Any], api: httpx.AsyncClient, object_store: ObjectStore
) -> None:
    cohort_id, first = exported["cohort"]["id"], exported["files"]
    job = await run_export(api, cohort_id, EXPORT)  # overwrite policy: skip (the default)
    files = await manifest(api, cohort_id, job["id"])
    assert [(f["path"], f["sha256"]) for f in files] == [(f["path"], f["sha256"]) for f in first]
    assert list(object_store.list(f"export/{cohort_id}/{job['id']}/")) == []
    assert job["summary"]["files_written"] == 0 and job["summary"]["stacks_reused"] == 10
    assert job["summary"]["validator"]["errors"] == 0
    # the listed files are downloadable: they are the first export's objects
    response = await api.get(files[0]["download_url"])
    assert hashlib.sha256(response.content).hexdigest() == files[0]["sha256"]


# --- the plugin in-process, on the same stack: failure isolation and redelivery ---------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service_pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool like the services' own (json/jsonb as Python values)."""
    pool = await create_pool(stack_settings, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def copy_plan(
    pool: asyncpg.Pool, from_job: str, to_job: uuid.UUID, suffix: str
) -> asyncpg.Record:
    """The first exported stack of `from_job` whose base path ends with `suffix`, planned again
    under `to_job` (as a new run would plan it)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM export.planned_stack WHERE job_id = $1 AND base_path LIKE $2 LIMIT 1",
            uuid.UUID(from_job),
            f"%{suffix}",
        )
        assert row is not None
        values = {**dict(row), "job_id": to_job}
        await conn.execute(
            f"INSERT INTO export.planned_stack ({', '.join(values)})"
            f" VALUES ({', '.join(f'${i}' for i in range(1, len(values) + 1))})",
            *values.values(),
        )
    return row


def work_item(
    exported: dict[str, Any], planned: asyncpg.Record, config: dict[str, Any]
) -> WorkItem:
    cohort = exported["cohort"]
    return WorkItem(
        stage=Stage.export,
        cohort=CohortRef(id=cohort["id"], name=cohort["name"], source_path=cohort["source_path"]),
        item_key=f"{planned['series_instance_uid']}|{planned['stack_key']}",
        config=config,
        data={"series": planned["series_instance_uid"], "stack_key": planned["stack_key"]},
    )


def item_context(pool: asyncpg.Pool, settings: Settings, job_id: uuid.UUID) -> ItemContext:
    async def never() -> bool:
        return False

    return ItemContext(pool, settings, job_id, never)


async def test_redelivered_item_rewrites_the_same_files(
    exported: dict[str, Any], service_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    job_id = uuid.uuid4()
    planned = await copy_plan(service_pool, exported["jobs"]["export"]["id"], job_id, "_T2w")
    plugin = ExporterPlugin(stack_settings)
    item = work_item(
        exported, planned, {"outputModes": ["nii.gz", "dcm"], "overwrite": "overwrite"}
    )
    ctx = item_context(service_pool, stack_settings, job_id)
    listings = []
    for _ in range(2):  # at-least-once delivery: the same item twice
        result = await plugin.process(ctx, item)
        assert not result.failed and result.counts["stacks_exported"] == 1
        async with service_pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT path, object_key, sha256 FROM export.manifest WHERE job_id = $1 ORDER BY path",
                job_id,
            )
        listings.append([tuple(r) for r in rows])
    assert listings[0] == listings[1] and len(listings[0]) > 2
    first = {f["path"]: f["sha256"] for f in exported["files"]}
    assert all(first[path] == sha for path, _, sha in listings[0]), "same bytes as the pipeline's"
    assert all(
        key.startswith(f"export/{exported['cohort']['id']}/{job_id}/") for _, key, _ in listings[0]
    )


async def test_a_source_changed_since_it_was_catalogued_fails_its_item(
    exported: dict[str, Any], service_pool: asyncpg.Pool, stack_settings: Settings
) -> None:
    """Files of a local folder are catalogued in place (ADR 0035): the export reads them there and
    refuses one whose bytes no longer have the catalogued SHA-256, saying so."""
    job_id = uuid.uuid4()
    planned = await copy_plan(service_pool, exported["jobs"]["export"]["id"], job_id, "_T2w")
    sources = [list(s) for s in planned["sources"]]
    assert all(s[1].startswith("source:") for s in sources), sources[:2]
    sources[0][2] = "0" * 64  # the catalog's hash of a file that was written over since
    async with service_pool.acquire() as conn:
        await conn.execute(
            "UPDATE export.planned_stack SET sources = $2 WHERE job_id = $1", job_id, sources
        )
    item = work_item(exported, planned, {"outputModes": ["nii.gz"], "overwrite": "overwrite"})
    result = await ExporterPlugin(stack_settings).process(
        item_context(service_pool, stack_settings, job_id), item
    )
    assert result.failed and result.counts == {"stacks_failed": 1}
    message = result.errors[0].message
    assert sources[0][1].removeprefix("source:") in message, message
    assert "since it was catalogued (run extraction again)" in message, message


async def test_a_stack_that_cannot_be_converted_fails_its_item_only(
    exported: dict[str, Any],
    service_pool: asyncpg.Pool,
    stack_settings: Settings,
    object_store: ObjectStore,
) -> None:
    job_id = uuid.uuid4()
    planned = await copy_plan(service_pool, exported["jobs"]["export"]["id"], job_id, "_PDw")
    # the stack's bytes are damaged in storage (but consistent with the catalog's hash)
    damaged = b"\0" * 128 + b"DICM" + b"not a data set" * 64
    key = f"raw/{exported['cohort']['id']}/damaged/{job_id}.dcm"
    digest = object_store.put_bytes(key, damaged)
    async with service_pool.acquire() as conn:
        await conn.execute(
            "UPDATE export.planned_stack SET sources = $2 WHERE job_id = $1",
            job_id,
            [["1.2.3.4.5", key, digest, len(damaged)]],
        )
    item = work_item(exported, planned, {"outputModes": ["nii.gz"], "overwrite": "overwrite"})
    result = await ExporterPlugin(stack_settings).process(
        item_context(service_pool, stack_settings, job_id), item
    )
    assert result.failed and result.counts == {"stacks_failed": 1}
    assert "ConverterError" in result.errors[0].message and "fallback" in result.errors[0].message
    async with service_pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM export.stack_export WHERE job_id = $1", job_id
        )
        listed = await conn.fetchval(
            "SELECT count(*) FROM export.manifest WHERE job_id = $1", job_id
        )
    assert (status, listed) == ("failed", 0)


async def test_object_storage_down_is_503_with_retry_after_and_recovers(
    exported: dict[str, Any], api: httpx.AsyncClient, stack: LocalStack
) -> None:
    """The S3 server stopped: a download is a 503 in the API's error format, then works again
    once `stack up` has started the server (last in this module: the outage touches every stage)."""
    entry = exported["files"][0]
    stack.stop_infra("s3")
    try:
        started = time.monotonic()
        down = await api.get(entry["download_url"])
        assert down.status_code == 503, down.text
        assert down.headers["content-type"] == "application/json"
        assert int(down.headers["retry-after"]) > 0
        assert "unreachable" in down.json()["detail"]
        assert time.monotonic() - started < 30, "a refused connection is not a long wait"
    finally:
        assert stack.up(infra_only=True).infra["s3"].healthy
    back = await api.get(entry["download_url"])
    assert back.status_code == 200 and hashlib.sha256(back.content).hexdigest() == entry["sha256"]


async def test_a_retracted_study_is_left_out_of_the_next_export(
    exported: dict[str, Any], api: httpx.AsyncClient
) -> None:
    """A `study.retracted.v1` notice: the next export plans without the study's stacks and says
    why in `not_exported`; the other studies are exported as before."""
    cohort = exported["cohort"]
    series = (await api.get(f"/api/cohorts/{cohort['id']}/series")).json()
    studies = sorted({s["study_instance_uid"] for s in series if s["study_instance_uid"]})
    assert len(studies) > 1
    uid = studies[0]
    notice = {
        "specversion": "1.0",
        "type": "org.example.pacs.study.retracted.v1",
        "source": "/hospital/pacs-it",
        "id": uuid.uuid4().hex,
        "subject": uid,
        "data": {
            "location": cohort["source_path"],
            "cohort": cohort["id"],
            "reason": "consent withdrawn",
        },
    }
    response = await api.post(
        "/api/events",
        content=json.dumps(notice),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert response.status_code == 200 and response.json()["outcome"] == "retracted", response.text
    job = await run_export(api, cohort["id"], {"outputModes": ["nii"]})
    files = await manifest(api, cohort["id"], job["id"])
    exported_series = {f["series_instance_uid"] for f in files if f["kind"] == "nifti"}
    retracted_series = {s["series_instance_uid"] for s in series if s["study_instance_uid"] == uid}
    assert exported_series and not exported_series & retracted_series
    reason = "study retracted by /hospital/pacs-it: consent withdrawn"
    n_stacks = sum(len(s["stacks"]) for s in series if s["study_instance_uid"] == uid)
    assert job["summary"]["not_exported"][reason] == n_stacks
    assert job["summary"]["validator"]["errors"] == 0
