"""A new study's export costs the study, not the cohort (ADR 0024).

Two cohorts of real subjects (2 and 6, one PatientID per QA set) run through the gateway,
extractor, sorter and exporter; then a new subject's study is announced and its scoped run goes
through every stage. The scoped export must plan that subject only, carry the others' files by
reference (the same object keys), and pass the validator on the whole tree. Then the same scoped
export is run again in this process with counting wrappers: the items planned, the catalog rows
read and the object-storage operations of planning, items and dataset files are the same for both
cohorts, and so are the validator's downloads once its kept tree has been synced before.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest
import pytest_asyncio
from pydicom.uid import generate_uid

from services.exporter import repository as repo
from services.exporter.plugin import ExporterPlugin
from shared.db import create_pool
from shared.events import CohortRef, StageRequested, WorkItem
from shared.settings import Settings
from shared.stage import ItemContext, RunInfo
from shared.storage import ObjectStore
from shared.topics import Stage
from tests.integration.polling import eventually, wait_job
from tests.integration.studies import study_uid
from tests.integration.test_exporter import link_sets, manifest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.needs_dcm2niix,
    pytest.mark.needs_validator,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.stack_services("gateway", "extractor", "sorter", "exporter"),
]

# one subject (PatientID) per set: the cohorts take the first 2 and all 6
SUBJECTS = {
    "dev": "dcm_qa_nih/In/20180918Si",
    "rogers": "dcm_qa_enh/In/Philips",
    "anon2339": "dcm_qa_fmap/In/GE/6_CV_Neuro",
    "test": "dcm_qa_pdt2/In/Siemens/VE11",
    "crlab": "dcm_qa_fmap/In/Siemens/3_gre_field_magph",
    "geservice": "dcm_qa_fmap/In/GE/2_3db0maps",
}
NEW_SUBJECT = {"irc": "dcm_qa_enh/In/Siemens"}
EXPORT = {"outputModes": ["nii.gz"]}
JOB_TIMEOUT_S = 900.0
CATALOG_READS = ("cohort_stacks", "cohort_studies", "cohort_instances", "subjects_of_studies")


class CountingStore(ObjectStore):
    """The exporter's object store, counting its calls by phase and operation."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.phase = "work"
        self.calls: Counter[tuple[str, str]] = Counter()

    def _count(self, operation: str) -> None:
        self.calls[(self.phase, operation)] += 1

    def put_bytes(self, key: str, data: bytes, *args: Any, **kwargs: Any) -> Any:
        self._count("put")
        return super().put_bytes(key, data, *args, **kwargs)

    def put_file(self, key: str, path: Path, *args: Any, **kwargs: Any) -> Any:
        self._count("put")
        return super().put_file(key, path, *args, **kwargs)

    def download(self, key: str, path: Path, bucket: str | None = None) -> str:
        self._count("get")
        return super().download(key, path, bucket)

    def get_bytes(self, key: str, bucket: str | None = None) -> bytes:
        self._count("get")
        return super().get_bytes(key, bucket)

    def stat(self, key: str, bucket: str | None = None) -> Any:
        self._count("stat")
        return super().stat(key, bucket)

    def list(self, prefix: str, bucket: str | None = None) -> Any:
        self._count("list")
        return super().list(prefix, bucket)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60.0) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service_pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(stack_settings, min_size=1, max_size=4)
    yield pool
    await pool.close()


def new_subject(dicom_root: Path, folder: Path) -> Path:
    """A new subject's study (hard links to its QA set) under `folder`."""
    return link_sets(dicom_root, folder, NEW_SUBJECT) / "irc"


def second_visit_same_day(dicom_root: Path, folder: Path) -> Path:
    """Another study of the `dev` subject, the same day, later: its set with new study, series and
    instance UIDs and a later StudyTime. Two studies on one day give the subject sessions `<day>a`
    and `<day>b`, so its earlier files are renamed."""
    target = folder / "dev-again"
    target.mkdir(parents=True)
    series: dict[str, str] = {}
    study = generate_uid()
    for path in sorted((dicom_root / SUBJECTS["dev"]).rglob("*")):
        if not path.is_file() or not pydicom.misc.is_dicom(path):
            continue
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series.setdefault(dataset.SeriesInstanceUID, generate_uid())
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.StudyTime = "235900"
        dataset.save_as(target / f"{path.parent.name}-{path.name}")
    return target


async def cohort_with_new_study(
    api: httpx.AsyncClient,
    dicom_root: Path,
    folder: Path,
    subjects: int,
    new_study: Callable[[Path, Path], Path] = new_subject,
    retract: str | None = None,
) -> dict[str, Any]:
    """A cohort of the first `subjects` sets exported whole, then (`retract`) a study retracted,
    then a new study (`new_study` makes it) announced and run through every stage (scoped)."""
    source = link_sets(dicom_root, folder, dict(list(SUBJECTS.items())[:subjects]))
    body = {"name": f"scoped-{subjects}-{uuid.uuid4().hex[:8]}", "source_path": str(source)}
    created = await api.post("/api/cohorts", json=body)
    assert created.status_code == 201, created.text
    cohort = created.json()
    run = await api.post(
        f"/api/cohorts/{cohort['id']}/pipeline", json={"sorting": {}, "export": EXPORT}
    )
    assert run.status_code == 202, run.text
    whole = {j["stage"]: j for j in run.json()["jobs"]}
    for stage in ("extraction", "sorting", "export"):
        whole[stage] = await wait_job(api, whole[stage]["id"], JOB_TIMEOUT_S)
        assert whole[stage]["status"] == "completed", json.dumps(whole[stage], indent=1)[:4000]

    if retract is not None:
        retraction = {
            "specversion": "1.0",
            "type": "org.example.pacs.study.retracted.v1",
            "source": "/hospital/pacs-it",
            "id": uuid.uuid4().hex,
            "subject": retract,
            "data": {
                "location": str(source),
                "cohort": cohort["id"],
                "reason": "consent withdrawn",
            },
        }
        retracted = await api.post(
            "/api/events",
            content=json.dumps(retraction),
            headers={"content-type": "application/cloudevents+json"},
        )
        assert retracted.json()["outcome"] == "retracted", retracted.text
    new = new_study(dicom_root, folder / "incoming")
    uid = study_uid(new)
    notice = {"study_instance_uid": uid, "location": str(new), "cohort": cohort["id"],
              "complete": True}  # fmt: skip
    accepted = await api.post("/api/studies", json=notice)
    assert accepted.status_code == 202, accepted.text

    async def scoped_export() -> dict[str, Any] | None:
        jobs = (await api.get(f"/api/jobs?cohort_id={cohort['id']}&limit=100")).json()
        scoped = [j for j in jobs if j["scoped"]]
        if len(scoped) < 3 or any(j["status"] in ("pending", "running") for j in scoped):
            return None
        assert all(j["status"] == "completed" for j in scoped), scoped
        return next(j for j in scoped if j["stage"] == "export")

    export = await eventually(scoped_export, timeout=JOB_TIMEOUT_S, interval=0.5)
    return {"cohort": cohort, "whole": whole["export"], "scoped": export, "study": uid}


async def object_keys(pool: asyncpg.Pool, job_id: str) -> dict[str, str]:
    """Where each file of an export job is stored, by path."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT path, object_key FROM export.manifest WHERE job_id = $1", uuid.UUID(job_id)
        )
    return {r["path"]: r["object_key"] for r in rows}


async def counted_scoped_export(
    pool: asyncpg.Pool,
    plugin: ExporterPlugin,
    settings: Settings,
    cohort: dict[str, Any],
    study: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """The same scoped export once more, in this process: what it planned, read and touched."""
    store = CountingStore(settings)
    plugin._store = store
    rows: Counter[str] = Counter()

    def counting(name: str) -> Callable[..., Any]:
        read = getattr(repo, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = await read(*args, **kwargs)
            rows[name] += len(result)
            return result

        return wrapper

    for name in CATALOG_READS:
        if hasattr(repo, name):
            monkeypatch.setattr(repo, name, counting(name))
    validate = plugin._validate

    validated = 0.0

    async def validating(*args: Any, **kwargs: Any) -> Any:
        nonlocal validated
        store.phase = "validate"
        began = time.perf_counter()
        try:
            return await validate(*args, **kwargs)
        finally:
            store.phase = "work"
            validated = time.perf_counter() - began

    monkeypatch.setattr(plugin, "_validate", validating)

    ref = CohortRef(id=cohort["id"], name=cohort["name"], source_path=cohort["source_path"])
    request = StageRequested(
        stage=Stage.export, cohort=ref, config=EXPORT, study_instance_uids=[study]
    )
    job_id = uuid.uuid4()

    async def never() -> bool:
        return False

    started = time.perf_counter()
    items = await plugin.plan(pool, request, job_id)
    planned = time.perf_counter()
    ctx = ItemContext(pool, settings, job_id, never)
    results = [
        await plugin.process(
            ctx,
            WorkItem(stage=Stage.export, cohort=ref, item_key=i.key, config=EXPORT, data=i.data),
        )
        for i in items
    ]
    processed = time.perf_counter()
    summary, _ = await plugin.finalize(
        pool,
        RunInfo(job_id, ref, Stage.export, EXPORT, request, len(items), len(items), 0, {}),
    )
    finished = time.perf_counter()
    monkeypatch.undo()
    return {
        "items": len(items),
        "failed": sum(r.failed for r in results),
        "catalog_rows": dict(rows),
        "s3": {f"{p}.{o}": n for (p, o), n in sorted(store.calls.items())},
        "seconds": {
            "plan": round(planned - started, 2),
            "items": round(processed - planned, 2),
            "finalize": round(finished - processed, 2),
            "of_which_validator": round(validated, 2),
        },
        "summary": summary,
    }


async def test_a_new_study_is_exported_at_the_cost_of_its_subject(
    api: httpx.AsyncClient,
    dicom_root: Path,
    tmp_path: Path,
    service_pool: asyncpg.Pool,
    stack_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured = {}
    for subjects in (2, 6):
        run = await cohort_with_new_study(api, dicom_root, tmp_path / str(subjects), subjects)
        cohort, scoped = run["cohort"], run["scoped"]
        summary = scoped["summary"]
        assert summary["subjects_planned"] == 1, summary
        assert summary["validator"]["errors"] == 0, summary["validator"]
        before = await object_keys(service_pool, run["whole"]["id"])
        after = await object_keys(service_pool, scoped["id"])
        earlier = [p for p in before if p.startswith("sub-")]
        assert len({p.split("/")[0] for p in earlier}) == subjects
        for path in earlier:  # carried by reference: the very objects of the first export
            assert after[path] == before[path], path
        assert summary["files_carried"] == len(earlier)
        listed = {f["path"] for f in await manifest(api, cohort["id"], scoped["id"])}
        assert listed == set(after) and "participants.tsv" in listed
        # this process's exporter keeps its trees apart from the service's: the first export
        # syncs its kept tree from nothing (every file), the next one only what changed
        settings = stack_settings.model_copy(
            update={"export_tree_cache_dir": tmp_path / "trees" / str(subjects)}
        )
        plugin = ExporterPlugin(settings)
        cold = await counted_scoped_export(
            service_pool, plugin, settings, cohort, run["study"], monkeypatch
        )
        counted = await counted_scoped_export(
            service_pool, plugin, settings, cohort, run["study"], monkeypatch
        )
        counted["cold_validate_get"] = cold["s3"].get("validate.get", 0)
        assert counted["failed"] == 0 and counted["summary"]["validator"]["errors"] == 0
        counted["subjects"] = subjects
        counted["service_export_s"] = round(
            (
                datetime.fromisoformat(scoped["finished_at"])
                - datetime.fromisoformat(scoped["started_at"])
            ).total_seconds(),
            2,
        )
        measured[subjects] = counted
        carried = {k: counted["summary"].get(k) for k in ("subjects_planned", "files_carried")}
        print(json.dumps({**{k: v for k, v in counted.items() if k != "summary"}, **carried}))

    small, large = measured[2], measured[6]
    assert small["items"] == large["items"] > 0
    assert small["catalog_rows"] == large["catalog_rows"]
    work = {k: v for k, v in small["s3"].items() if k.startswith("work.")}
    assert work == {k: v for k, v in large["s3"].items() if k.startswith("work.")}
    assert "work.list" not in work  # nothing of the earlier subjects is listed
    # the validator's tree is synced, not downloaded: what it fetches is the cohort's the first
    # time only, then the same for both cohorts
    assert small["cold_validate_get"] < large["cold_validate_get"]
    assert small["s3"].get("validate.get", 0) == large["s3"].get("validate.get", 0)

    # the exporter service kept the last cohort's tree on its disk; deleting the cohort removes it
    kept = stack_settings.export_tree_cache_dir / str(cohort["id"])
    assert (kept / "tree" / "participants.tsv").is_file()
    assert (await api.delete(f"/api/cohorts/{cohort['id']}")).status_code == 204

    async def forgotten() -> bool:
        return not kept.exists()

    await eventually(forgotten, what="the deleted cohort's kept tree removed")


async def test_a_second_visit_renames_its_subject_only(
    api: httpx.AsyncClient, dicom_root: Path, tmp_path: Path, service_pool: asyncpg.Pool
) -> None:
    """A known subject's new study on the day of its first: the subject is re-planned whole (its
    session becomes `<day>a`, the new one `<day>b`), the other subject is carried unchanged, and
    participants.tsv still lists both."""
    run = await cohort_with_new_study(api, dicom_root, tmp_path, 2, second_visit_same_day)
    cohort, scoped = run["cohort"], run["scoped"]
    assert scoped["summary"]["subjects_planned"] == 1, scoped["summary"]
    assert scoped["summary"]["validator"]["errors"] == 0, scoped["summary"]["validator"]
    before = await object_keys(service_pool, run["whole"]["id"])
    after = await object_keys(service_pool, scoped["id"])
    subjects = {p.split("/")[0] for p in before if p.startswith("sub-")}
    assert len(subjects) == 2

    def sessions(subject: str, paths: dict[str, str]) -> set[str]:
        return {p.split("/")[1] for p in paths if p.startswith(f"{subject}/ses-")}

    (renamed,) = {s for s in subjects if len(sessions(s, after)) == 2}
    (other,) = subjects - {renamed}
    assert len(sessions(renamed, before)) == 1
    for path, key in before.items():
        if path.startswith(f"{other}/"):
            assert after[path] == key, path
        elif path.startswith(f"{renamed}/ses-"):
            assert path not in after, path  # named again: its day now has two sessions
    (day,) = sessions(renamed, before)
    assert sessions(renamed, after) == {f"{day}a", f"{day}b"}
    files = {f["path"]: f for f in await manifest(api, cohort["id"], scoped["id"])}
    rows = (await api.get(files["participants.tsv"]["download_url"])).text.splitlines()
    assert sorted(r.split("\t")[0] for r in rows[1:]) == sorted(subjects)


async def test_a_study_retracted_before_a_new_one_leaves_the_next_tree(
    api: httpx.AsyncClient, dicom_root: Path, tmp_path: Path, service_pool: asyncpg.Pool
) -> None:
    """A retraction takes its study out of the cohort's next export, and a new study's export is
    one: the retracted study's subject is re-planned (here: left with nothing), not carried."""
    retracted_uid = study_uid(dicom_root / SUBJECTS["rogers"])

    run_before = await cohort_with_new_study(
        api, dicom_root, tmp_path, 2, new_subject, retract=retracted_uid
    )
    scoped = run_before["scoped"]
    assert scoped["summary"]["subjects_planned"] == 2, scoped["summary"]
    assert scoped["summary"]["validator"]["errors"] == 0, scoped["summary"]["validator"]
    before = await object_keys(service_pool, run_before["whole"]["id"])
    after = await object_keys(service_pool, scoped["id"])
    subjects_before = {p.split("/")[0] for p in before if p.startswith("sub-")}
    subjects_after = {p.split("/")[0] for p in after if p.startswith("sub-")}
    assert len(subjects_before) == 2 and len(subjects_after) == 2
    (kept,) = subjects_before & subjects_after  # the other earlier subject, carried
    assert all(after[p] == k for p, k in before.items() if p.startswith(f"{kept}/"))
    files = await manifest(api, run_before["cohort"]["id"], scoped["id"])
    participants = next(f for f in files if f["path"] == "participants.tsv")
    rows = (await api.get(participants["download_url"])).text.splitlines()
    assert sorted(r.split("\t")[0] for r in rows[1:]) == sorted(subjects_after)
