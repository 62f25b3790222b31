"""The gateway against the real Postgres, Kafka-protocol broker and S3 server of the test stack.

Drives the public HTTP API (/api/openapi.json) and the event discipline: run requests land on their
topics with the right routing slip, progress/completion/failure events move jobs and cohort metrics,
cancel publishes control and flips `gateway.job_control_v`, new studies start scoped runs.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema
import pydicom
import pydicom.misc
import pytest
import pytest_asyncio
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI
from pydantic import SecretStr
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from services.gateway import catalog as gateway_catalog
from services.gateway.app import app_factory
from shared import topics
from shared.db import create_pool
from shared.events import (
    CohortRef,
    DeadLetter,
    Envelope,
    ItemError,
    JobProgress,
    Payload,
    StageCompleted,
    StageFailed,
    StageRequested,
    StudyReceived,
    StudyRetraction,
    WorkItem,
)
from shared.secrets import unseal
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.topics import Stage
from tests.integration.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

TOKEN = "gateway-test-token"
PASSWORD = "audit-password-4-tests"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    for name in ("study-a", "study-b", "new-study"):
        (root / name).mkdir()
    (root / "file.dcm").write_bytes(b"DICM")
    return root


@pytest.fixture(scope="module")
def settings(stack: Any, data_root: Path) -> Settings:
    return Settings(
        data_roots=[data_root],
        api_token=SecretStr(TOKEN),
        project_secret=SecretStr("gw-secret"),
        webhook_retry_base_s=0.2,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(settings: Settings) -> AsyncIterator[FastAPI]:
    """The gateway app with its lifespan running (migrations, broker consumers, outbox relay)."""
    app = app_factory(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(gateway: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(settings: Settings, api: httpx.AsyncClient) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    kafka = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await kafka.start()
    yield kafka
    await kafka.stop()


async def publish(
    producer: AIOKafkaProducer, topic: str, envelope: Envelope, key: str | None = None
) -> None:
    await producer.send_and_wait(
        topic, envelope.model_dump_json().encode(), key=key.encode() if key else None
    )


async def find_on_topic(
    settings: Settings, topic: str, match: Callable[[Envelope], bool], timeout: float = 20.0
) -> Envelope:
    """The first envelope on `topic` (from the beginning) that `match`es."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    envelope = Envelope.model_validate_json(record.value)
                    if match(envelope):
                        return envelope
        raise AssertionError(f"no matching event on {topic}")
    finally:
        await consumer.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def new_cohort(
    api: httpx.AsyncClient, data_root: Path, *, anonymization: bool = False, **extra: Any
) -> dict[str, Any]:
    body = {
        "name": unique("cohort"),
        "source_path": str(data_root / "study-a"),
        "description": "integration test",
        "owner": "tests",
        "tags": ["it"],
        "anonymization_enabled": anonymization,
        **extra,
    }
    response = await api.post("/api/cohorts", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def event(payload: Payload, cohort_id: str, job_id: str, source: str = "test") -> Envelope:
    return Envelope.wrap(
        payload, source=source, cohort_id=uuid.UUID(cohort_id), job_id=uuid.UUID(job_id)
    )


def ref(cohort: dict[str, Any]) -> CohortRef:
    return CohortRef(id=cohort["id"], name=cohort["name"], source_path=cohort["source_path"])


# --- open routes, auth, OpenAPI -------------------------------------------------------------------


async def test_health_page_and_openapi_are_served(api: httpx.AsyncClient) -> None:
    anonymous = {"Authorization": ""}
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/static/style.css"):
        response = await api.get(path, headers=anonymous)
        assert response.status_code == 200, path
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    assert "<html" in (await api.get("/", headers=anonymous)).text.lower()
    spec = (await api.get("/api/openapi.json")).json()
    for path in (
        "/api/cohorts",
        "/api/cohorts/{cohort_id}",
        "/api/cohorts/{cohort_id}/stages/{stage}/run",
        "/api/cohorts/{cohort_id}/pipeline",
        "/api/cohorts/{cohort_id}/series",
        "/api/cohorts/{cohort_id}/exports/{job_id}",
        "/api/cohorts/{cohort_id}/exports/{job_id}/files/{path}",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/cancel",
        "/api/studies",
        "/api/events",
        "/api/webhooks",
    ):
        assert path in spec["paths"], path
    contracts = (await api.get("/api/asyncapi.json")).json()
    assert contracts["asyncapi"] == "3.0.0"
    assert contracts["channels"]["studiesReceived"]["address"] == topics.STUDIES_RECEIVED
    assert (await api.get("/api/asyncapi.json", headers=anonymous)).status_code == 401


async def test_the_spec_documents_every_error_with_its_real_body(
    api: httpx.AsyncClient, data_root: Path
) -> None:
    spec = (await api.get("/api/openapi.json")).json()
    error = spec["components"]["schemas"]["Error"]
    assert spec["security"] == [{"bearer": []}]  # a token is configured here
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert {"401", "503"} <= codes, (method, path)
            assert operation["responses"]["503"]["headers"]["Retry-After"]["required"]
            if "{" in path:
                assert "404" in codes, (method, path)
            if method != "get":
                assert "409" in codes, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= codes, (method, path)
            # a 304 (a held request whose answer did not change) has no body by definition
            for code in codes - {"200", "201", "202", "204", "304"}:
                schema = operation["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    # what the handlers really send fits it: a sentence, or FastAPI's list of problems
    refs = json.loads(json.dumps(error).replace("#/components/schemas/", "#/$defs/"))
    validator = jsonschema.Draft202012Validator({**refs, "$defs": spec["components"]["schemas"]})
    sentence = await api.post(
        "/api/cohorts", json={"name": unique("bad"), "source_path": "/nowhere/at/all"}
    )
    listed = await api.post("/api/cohorts", json={"name": 3})
    missing = await api.get(f"/api/cohorts/{uuid.uuid4()}")
    name = unique("twice")
    await new_cohort(api, data_root, name=name)
    twice = await api.post(
        "/api/cohorts", json={"name": name, "source_path": str(data_root / "study-a")}
    )
    for response, code in ((sentence, 422), (listed, 422), (missing, 404), (twice, 409)):
        assert response.status_code == code, response.text
        assert response.headers["content-type"] == "application/json"
        validator.validate(response.json())
    assert isinstance(sentence.json()["detail"], str) and isinstance(listed.json()["detail"], list)


async def test_a_body_over_the_limit_is_413(api: httpx.AsyncClient, settings: Settings) -> None:
    too_big = b"[" + b"0," * (settings.api_max_body_bytes // 2) + b"0]"
    response = await api.post(
        "/api/cohorts", content=too_big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]


async def test_a_405_names_every_method_of_its_path(api: httpx.AsyncClient) -> None:
    response = await api.put(f"/api/cohorts/{uuid.uuid4()}")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE"}
    assert response.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"]
)
async def test_api_needs_the_token(api: httpx.AsyncClient, header: str | None) -> None:
    headers = {"Authorization": header or ""}
    for method, path in (
        ("GET", "/api/cohorts"),
        ("GET", "/api/openapi.json"),
        ("POST", "/api/studies"),
        ("GET", "/api/no-such-route"),
    ):
        response = await api.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert "token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


# --- cohorts ----------------------------------------------------------------------------------------


async def test_cohort_create_read_update_delete(api: httpx.AsyncClient, data_root: Path) -> None:
    cohort = await new_cohort(api, data_root, anonymization=True)
    assert cohort["status"] == "idle"
    assert cohort["source_path"] == str(data_root / "study-a")
    assert cohort["tags"] == ["it"]
    assert cohort["completion_percentage"] == 0
    for metric in ("total_subjects", "total_sessions", "total_series"):
        assert cohort[metric] == 0
    assert [(s["stage"], s["state"], s["job_id"]) for s in cohort["stages"]] == [
        ("anonymization", "not_started", None),
        ("extraction", "not_started", None),
        ("sorting", "not_started", None),
        ("export", "not_started", None),
    ]
    assert cohort["created_at"] and cohort["updated_at"]

    listed = (await api.get("/api/cohorts")).json()
    assert cohort["id"] in [c["id"] for c in listed]
    assert cohort["id"] in [c["id"] for c in (await api.get("/api/cohorts?status=idle")).json()]
    assert (await api.get("/api/cohorts?status=busy")).status_code == 422
    assert (await api.get(f"/api/cohorts/{cohort['id']}")).json()["name"] == cohort["name"]

    patched = await api.patch(
        f"/api/cohorts/{cohort['id']}",
        json={"description": "new words", "tags": ["a", "b"], "anonymization_enabled": False},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["description"] == "new words"
    assert [s["stage"] for s in patched.json()["stages"]] == ["extraction", "sorting", "export"]
    assert (
        await api.patch(f"/api/cohorts/{cohort['id']}", json={"owner": None})
    ).status_code == 422
    assert (await api.patch(f"/api/cohorts/{cohort['id']}", json={"colour": 1})).status_code == 422

    other = await new_cohort(api, data_root)
    clash = await api.patch(f"/api/cohorts/{other['id']}", json={"name": cohort["name"].upper()})
    assert clash.status_code == 409
    assert "already exists" in clash.json()["detail"]

    assert (await api.delete(f"/api/cohorts/{cohort['id']}")).status_code == 204
    assert (await api.get(f"/api/cohorts/{cohort['id']}")).status_code == 404
    assert (await api.delete(f"/api/cohorts/{cohort['id']}")).status_code == 404


async def test_duplicate_names_conflict(api: httpx.AsyncClient, data_root: Path) -> None:
    cohort = await new_cohort(api, data_root)
    again = await api.post(
        "/api/cohorts",
        json={"name": cohort["name"].upper(), "source_path": str(data_root / "study-b")},
    )
    assert again.status_code == 409
    assert cohort["name"].upper() in again.json()["detail"]


@pytest.mark.parametrize(
    ("source_path", "message"),
    [
        ("relative/path", "absolute"),
        ("/etc", "outside the allowed data roots"),
        ("{root}/../", "outside the allowed data roots"),
        ("{root}/study-a/../../", "outside the allowed data roots"),
        ("{root}/missing", "does not exist"),
        ("{root}/file.dcm", "not a directory"),
        ("ftp://host/data", "s3://"),
        ("{root}/" + "x" * 300, "too long"),
        ("s3://", "bucket"),
    ],
)
async def test_bad_source_paths_are_refused(
    api: httpx.AsyncClient, data_root: Path, source_path: str, message: str
) -> None:
    response = await api.post(
        "/api/cohorts",
        json={"name": unique("bad"), "source_path": source_path.format(root=data_root)},
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "x"},
        {"name": "", "source_path": "s3://bucket/x"},
        {"name": "a/b", "source_path": "s3://bucket/x"},
        {"name": str(uuid.uuid4()), "source_path": "s3://bucket/x"},
        {"name": "ok", "source_path": "s3://bucket/x", "tags": "not-a-list"},
        {"name": "ok", "source_path": "s3://bucket/x", "anonymization_enabled": "perhaps"},
        {"name": "ok", "source_path": "s3://bucket/x", "unknown": 1},
        {"name": "ok", "source_path": "/tmp/a\x00b"},
        {"name": "ok", "source_path": "s3://bucket/x", "description": "a\x00b"},
        {"name": "ok", "source_path": "s3://bucket/x", "tags": ["a\x00"]},
        [],
        "name",
    ],
)
async def test_malformed_cohorts_are_422(api: httpx.AsyncClient, body: Any) -> None:
    response = await api.post("/api/cohorts", json=body)
    assert response.status_code == 422
    assert "detail" in response.json()


async def test_s3_sources_and_unknown_ids(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/api/cohorts", json={"name": unique("s3"), "source_path": "s3://pacs-export/2024/ms"}
    )
    assert response.status_code == 201
    assert response.json()["source_path"] == "s3://pacs-export/2024/ms"
    missing = uuid.uuid4()
    assert (await api.get(f"/api/cohorts/{missing}")).status_code == 404
    assert (await api.get("/api/cohorts/not-a-uuid")).status_code == 422
    assert (await api.get(f"/api/jobs/{missing}")).status_code == 404
    assert (await api.post(f"/api/jobs/{missing}/cancel")).status_code == 404
    assert (await api.post(f"/api/cohorts/{missing}/pipeline", json={})).status_code == 404
    run = await api.post(f"/api/cohorts/{missing}/stages/extraction/run", json={"config": {}})
    assert run.status_code == 404
    assert (await api.get(f"/api/cohorts/{missing}/series")).status_code == 404


# --- stage runs ---------------------------------------------------------------------------------------


async def test_stage_order_and_config_are_enforced(
    api: httpx.AsyncClient, data_root: Path, settings: Settings
) -> None:
    cohort = await new_cohort(api, data_root)
    base = f"/api/cohorts/{cohort['id']}/stages"

    early = await api.post(f"{base}/sorting/run", json={"config": {}})
    assert early.status_code == 409
    assert "sorting needs extraction completed first" in early.json()["detail"]
    anon = await api.post(f"{base}/anonymization/run", json={"config": {}})
    assert anon.status_code == 409
    assert "anonymization is not enabled" in anon.json()["detail"]
    assert (await api.post(f"{base}/tagging/run", json={"config": {}})).status_code == 422

    bad = await api.post(f"{base}/extraction/run", json={"config": {"threads": 4}})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["config", "threads"]
    bad = await api.post(f"{base}/extraction/run", json={"config": {"process_pool_workers": 0}})
    assert bad.status_code == 422
    bad = await api.post(f"{base}/extraction/run", json={"config": {"process_pool_workers": 1e30}})
    assert bad.status_code == 422

    started = await api.post(f"{base}/extraction/run", json={"config": {"process_pool_workers": 2}})
    assert started.status_code == 202, started.text
    job = started.json()
    assert (job["stage"], job["status"], job["cohort_id"]) == (
        "extraction",
        "pending",
        cohort["id"],
    )
    assert job["config"] == {"process_pool_workers": 2}
    again = await api.post(f"{base}/extraction/run", json={"config": {}})
    assert again.status_code == 409
    assert "already pending" in again.json()["detail"]
    assert (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).status_code == 409
    busy = await api.delete(f"/api/cohorts/{cohort['id']}")
    assert busy.status_code == 409
    moved = await api.patch(
        f"/api/cohorts/{cohort['id']}", json={"source_path": str(data_root / "study-b")}
    )
    assert moved.status_code == 409

    requested = await find_on_topic(
        settings, topics.requested(Stage.extraction), lambda e: str(e.job_id) == job["id"]
    )
    assert requested.type == "StageRequested"
    assert str(requested.cohort_id) == cohort["id"]
    assert requested.payload["slip"] == []
    assert requested.payload["config"] == {"process_pool_workers": 2}
    assert requested.payload["cohort"]["source_path"] == cohort["source_path"]

    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert state["status"] == "in_progress"
    assert state["stages"][0] == {
        "stage": "extraction",
        "state": "pending",
        "job_id": job["id"],
        "progress": 0.0,
    }


async def test_a_cohort_created_with_its_pipeline_exists_only_if_the_config_is_valid(
    api: httpx.AsyncClient, data_root: Path
) -> None:
    """`pipeline` in the create body: configs checked and the cohort written in one transaction,
    so a refused config (422) leaves no cohort behind; a valid one starts the pipeline."""
    name = f"with-pipeline-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "source_path": str(data_root / "study-a")}
    bad = await api.post(
        "/api/cohorts", json={**body, "pipeline": {"extraction": {"process_pool_wrkers": 2}}}
    )
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"][0]["loc"] == ["body", "extraction", "process_pool_wrkers"]
    names = [c["name"] for c in (await api.get("/api/cohorts")).json()]
    assert name not in names
    made = await api.post(
        "/api/cohorts", json={**body, "pipeline": {"extraction": {"batch_files": 16}}}
    )
    assert made.status_code == 201, made.text
    cohort = made.json()
    assert [s["state"] for s in cohort["stages"]] == ["pending"] * 3
    jobs = (await api.get(f"/api/cohorts/{cohort['id']}/jobs")).json()
    assert sorted(j["stage"] for j in jobs) == ["export", "extraction", "sorting"]
    extraction = next(j for j in jobs if j["stage"] == "extraction")
    assert extraction["config"] == {"batch_files": 16}


async def test_pipeline_request_carries_the_routing_slip_and_sealed_secrets(
    api: httpx.AsyncClient, data_root: Path, settings: Settings, db: asyncpg.Pool
) -> None:
    cohort = await new_cohort(api, data_root, anonymization=True)
    url = f"/api/cohorts/{cohort['id']}/pipeline"
    missing = await api.post(url, json={})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"][:3] == ["body", "anonymization", "audit_export"]
    assert (await api.post(url, json={"sorting": {"profile": "fast"}})).status_code == 422
    assert (await api.post(url, json={"qc": {}})).status_code == 422

    body = {
        "anonymization": {
            "patient_id.strategy": "sequential",
            "audit_export": {"format": "encrypted_excel", "password": PASSWORD},
        },
        "sorting": {"profile": "research", "selectedModalities": ["MR"]},
        "export": {"layout": "bids", "outputModes": ["nii.gz"]},
    }
    response = await api.post(url, json=body)
    assert response.status_code == 202, response.text
    run = response.json()
    jobs = run["jobs"]
    assert [j["stage"] for j in jobs] == ["anonymization", "extraction", "sorting", "export"]
    assert {j["status"] for j in jobs} == {"pending"}
    assert jobs[0]["config"]["audit_export"]["password"] == "***"

    requested = await find_on_topic(
        settings, topics.requested(Stage.anonymization), lambda e: str(e.job_id) == jobs[0]["id"]
    )
    assert str(requested.correlation_id) == run["run_id"]
    payload = requested.payload
    assert payload["stage"] == "anonymization"
    assert payload["config"]["patient_id"] == {"strategy": "sequential"}
    sealed = payload["config"]["audit_export"]["password"]
    assert sealed.startswith("sealed:v1:") and PASSWORD not in sealed
    assert unseal(sealed, settings) == PASSWORD
    assert [(s["stage"], s["job_id"]) for s in payload["slip"]] == [
        (j["stage"], j["id"]) for j in jobs[1:]
    ]
    assert payload["slip"][1]["config"] == {"profile": "research", "selectedModalities": ["MR"]}
    assert payload["slip"][2]["config"] == {"layout": "bids", "outputModes": ["nii.gz"]}

    # the password is nowhere in clear in the gateway's tables, outbox included
    async with db.acquire() as conn:
        for table in ("cohorts", "jobs", "job_events", "outbox", "pipeline_runs"):
            dump = await conn.fetchval(f"SELECT string_agg(t::text, '') FROM gateway.{table} t")
            assert PASSWORD not in (dump or ""), table
    listed = await api.get(f"/api/jobs?cohort_id={cohort['id']}")
    assert PASSWORD not in listed.text


async def test_concurrent_requests_start_one_run(api: httpx.AsyncClient, data_root: Path) -> None:
    cohort = await new_cohort(api, data_root)
    url = f"/api/cohorts/{cohort['id']}"
    answers = await asyncio.gather(
        *(api.post(f"{url}/pipeline", json={}) for _ in range(3)),
        *(api.post(f"{url}/stages/extraction/run", json={"config": {}}) for _ in range(3)),
    )
    assert sorted(a.status_code for a in answers) == [202, 409, 409, 409, 409, 409]
    jobs = (await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()
    assert len([j for j in jobs if j["stage"] == "extraction"]) == 1


# --- events from the stages -----------------------------------------------------------------------


async def job(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    return dict((await api.get(f"/api/jobs/{job_id}")).json())


async def test_events_move_jobs_and_cohort_metrics(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer
) -> None:
    cohort = await new_cohort(api, data_root)
    jobs = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"]
    extraction, sorting, export = (j["id"] for j in jobs)

    progress = JobProgress(
        stage=Stage.extraction,
        items_total=4,
        items_done=2,
        errors=[ItemError(item="study-1/x.dcm", message="not DICOM")],
        summary={"subjects": 1, "studies": 1, "series": 3},
    )
    await publish(producer, topics.JOBS_PROGRESS, event(progress, cohort["id"], extraction))

    async def running() -> dict[str, Any] | None:
        found = await job(api, extraction)
        return found if found["status"] == "running" else None

    found = await eventually(running)
    assert (found["progress"], found["items_total"], found["items_done"]) == (50.0, 4, 2)
    assert found["errors"] == [{"item": "study-1/x.dcm", "message": "not DICOM"}]
    assert found["started_at"] is not None and found["finished_at"] is None
    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert state["status"] == "in_progress"
    assert state["completion_percentage"] == 16.7
    assert (state["total_subjects"], state["total_series"]) == (1, 3)

    summary = {"subjects": 2, "studies": 3, "series": 10, "instances": 120, "rejected": 1}
    done = StageCompleted(
        stage=Stage.extraction,
        cohort=ref(cohort),
        items_total=4,
        items_done=4,
        items_failed=0,
        summary=summary,
        output_prefix=None,
    )
    completed_event = event(done, cohort["id"], extraction)
    await publish(producer, topics.completed(Stage.extraction), completed_event)

    async def completed() -> dict[str, Any] | None:
        found = await job(api, extraction)
        return found if found["status"] == "completed" else None

    found = await eventually(completed)
    assert found["progress"] == 100.0 and found["finished_at"] is not None
    assert found["summary"]["instances"] == 120
    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert (state["total_subjects"], state["total_sessions"], state["total_series"]) == (2, 3, 10)
    assert state["completion_percentage"] == 33.3
    assert state["status"] == "in_progress"
    assert (await job(api, sorting))["status"] == "pending"  # until its own first progress

    # a redelivered completion changes nothing
    await publish(producer, topics.completed(Stage.extraction), completed_event)
    late = JobProgress(stage=Stage.extraction, items_total=4, items_done=1)
    await publish(producer, topics.JOBS_PROGRESS, event(late, cohort["id"], extraction))

    await publish(
        producer,
        topics.JOBS_PROGRESS,
        event(JobProgress(stage=Stage.sorting, items_total=10), cohort["id"], sorting),
    )

    async def sorting_running() -> bool:
        return (await job(api, sorting))["status"] == "running"

    await eventually(sorting_running)
    failure = StageFailed(
        stage=Stage.sorting,
        cohort=ref(cohort),
        error="every item failed",
        items_total=10,
        items_failed=10,
        errors=[ItemError(item="stack-1", message="no rules matched")],
    )
    await publish(producer, topics.failed(Stage.sorting), event(failure, cohort["id"], sorting))

    async def sorting_failed() -> dict[str, Any] | None:
        found = await job(api, sorting)
        return found if found["status"] == "failed" else None

    found = await eventually(sorting_failed)
    assert found["status_reason"] == "every item failed"
    assert found["errors"] == [{"item": "stack-1", "message": "no rules matched"}]
    cancelled = await job(api, export)
    assert cancelled["status"] == "cancelled"
    assert cancelled["status_reason"] == "sorting failed: every item failed"
    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert state["status"] == "idle"
    assert [s["state"] for s in state["stages"]] == ["completed", "failed", "cancelled"]

    events = (await api.get(f"/api/jobs/{extraction}/events")).json()
    assert [(e["from_status"], e["to_status"]) for e in events] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "completed"),
    ]
    assert (await job(api, extraction))["items_done"] == 4  # late progress did not go back
    filtered = (await api.get(f"/api/jobs?cohort_id={cohort['id']}&status=failed")).json()
    assert [j["id"] for j in filtered] == [sorting]
    assert (await api.get("/api/jobs?status=lost")).status_code == 422

    # the pipeline resumes from the failed stage
    again = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()
    assert [j["stage"] for j in again["jobs"]] == ["sorting", "export"]


async def test_cancel_publishes_control_and_flips_the_view(
    api: httpx.AsyncClient,
    data_root: Path,
    settings: Settings,
    db: asyncpg.Pool,
    producer: AIOKafkaProducer,
) -> None:
    cohort = await new_cohort(api, data_root)
    jobs = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"]
    first = jobs[0]["id"]
    await publish(
        producer,
        topics.JOBS_PROGRESS,
        event(
            JobProgress(stage=Stage.extraction, items_total=8, items_done=1), cohort["id"], first
        ),
    )

    async def running() -> bool:
        return (await job(api, first))["status"] == "running"

    await eventually(running)
    async with db.acquire() as conn:
        view = await conn.fetchval(
            "SELECT cancelled FROM gateway.job_control_v WHERE job_id = $1", uuid.UUID(first)
        )
    assert view is False

    response = await api.post(f"/api/jobs/{first}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert [(await job(api, j["id"]))["status"] for j in jobs] == ["cancelled"] * 3
    assert (await api.post(f"/api/jobs/{first}/cancel")).status_code == 409

    control = await find_on_topic(settings, topics.JOBS_CONTROL, lambda e: str(e.job_id) == first)
    assert control.type == "JobControl" and control.payload["action"] == "cancel"
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT job_id, cancelled FROM gateway.job_control_v WHERE job_id = ANY($1::uuid[])",
            [uuid.UUID(j["id"]) for j in jobs],
        )
    assert {r["cancelled"] for r in rows} == {True} and len(rows) == 3
    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert state["status"] == "idle"

    # a completion arriving after the cancel keeps the job cancelled
    late = StageCompleted(
        stage=Stage.extraction, cohort=ref(cohort), items_total=8, items_done=8, items_failed=0
    )
    await publish(producer, topics.completed(Stage.extraction), event(late, cohort["id"], first))

    async def counted() -> bool:
        return (await job(api, first))["items_done"] == 8

    await eventually(counted)
    assert (await job(api, first))["status"] == "cancelled"


async def test_a_request_held_for_a_run_answers_when_a_job_changes(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer
) -> None:
    cohort = await new_cohort(api, data_root)
    jobs = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"]
    run_id, first = jobs[0]["run_id"], jobs[0]["id"]
    plain = await api.get("/api/jobs", params={"run_id": run_id})
    assert [j["id"] for j in plain.json()] == [j["id"] for j in jobs]
    etag = plain.headers["etag"]

    # nothing changes: held for the wait asked for, then 304 with the same ETag
    held = {"If-None-Match": etag, "Prefer": "wait=0.5"}
    started = time.monotonic()
    unchanged = await api.get("/api/jobs", params={"run_id": run_id}, headers=held)
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag
    assert time.monotonic() - started >= 0.4

    # a progress event moves the first job: the held request answers then, long before its wait
    async def progress_later() -> None:
        await asyncio.sleep(0.3)
        moved = JobProgress(stage=Stage.extraction, items_total=8, items_done=3)
        await publish(producer, topics.JOBS_PROGRESS, event(moved, cohort["id"], first))

    mover = asyncio.create_task(progress_later())
    started = time.monotonic()
    changed = await api.get(
        "/api/jobs",
        params={"run_id": run_id},
        headers={"If-None-Match": etag, "Prefer": "wait=10"},
    )
    await mover
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()[0]["items_done"] == 3
    assert time.monotonic() - started < 8


# --- new studies ----------------------------------------------------------------------------------------


async def test_post_study_starts_a_scoped_run(
    api: httpx.AsyncClient, data_root: Path, settings: Settings
) -> None:
    cohort = await new_cohort(api, data_root)
    body = {
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "location": str(data_root / "new-study"),
        "cohort": cohort["name"],
        "complete": True,
    }
    response = await api.post("/api/studies", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["cohort_id"] == cohort["id"]
    assert [j["stage"] for j in accepted["jobs"]] == ["extraction", "sorting", "export"]
    assert all(j["scoped"] for j in accepted["jobs"])

    requested = await find_on_topic(
        settings,
        topics.requested(Stage.extraction),
        lambda e: str(e.job_id) == accepted["jobs"][0]["id"],
    )
    assert requested.payload["study_instance_uids"] == [body["study_instance_uid"]]
    assert requested.payload["location"] == body["location"]
    assert len(requested.payload["slip"]) == 2

    state = (await api.get(f"/api/cohorts/{cohort['id']}")).json()
    assert state["status"] == "in_progress"  # busy, but its stages are not changed by a study
    assert {s["state"] for s in state["stages"]} == {"not_started"}

    # the same study with the same files again (by id this time): nothing new starts
    by_id = await api.post("/api/studies", json={**body, "cohort": cohort["id"]})
    assert by_id.status_code == 200, by_id.text
    again = by_id.json()
    assert again["outcome"] == "duplicate" and again["duplicate_of"] == accepted["notice"]
    assert again["run_id"] == accepted["run_id"] and len(again["jobs"]) == 3
    no_run = await api.post("/api/studies", json={**body, "run_pipeline": False})
    assert no_run.status_code == 202 and no_run.json()["jobs"] == []
    assert len((await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()) == 3

    unknown = await api.post("/api/studies", json={**body, "cohort": unique("nobody")})
    assert unknown.status_code == 404
    anonymous = await api.post("/api/studies", json={**body, "cohort": None})
    assert anonymous.status_code == 422
    assert "source_path containing the location" in anonymous.json()["detail"]

    # without a cohort name, the cohort whose source folder holds the study takes it
    (data_root / "study-b" / "incoming" / "1.2.3").mkdir(parents=True)
    owner = await new_cohort(api, data_root, source_path=str(data_root / "study-b"))
    dropped = await api.post(
        "/api/studies",
        json={
            "study_instance_uid": "1.2.3",
            "location": str(data_root / "study-b/incoming/1.2.3"),
            "complete": True,
        },
    )
    assert dropped.status_code == 202, dropped.text
    assert dropped.json()["cohort_id"] == owner["id"]
    nul = await api.post("/api/studies", json={**body, "location": f"{data_root}/a\x00b"})
    assert nul.status_code == 422
    outside = await api.post("/api/studies", json={**body, "location": "/etc"})
    assert outside.status_code == 422
    assert "outside" in outside.json()["detail"]
    assert (await api.post("/api/studies", json={"location": "/x"})).status_code == 422


async def test_studies_received_on_kafka_start_a_scoped_run(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer, db: asyncpg.Pool
) -> None:
    cohort = await new_cohort(api, data_root)
    study = StudyReceived(
        study_instance_uid="1.2.826.0.1.3680043.8.498.2",
        location=str(data_root / "new-study"),
        cohort=cohort["name"],
        complete=True,
    )
    envelope = Envelope.wrap(study, source="orthanc")
    await publish(producer, topics.STUDIES_RECEIVED, envelope, key=study.study_instance_uid)
    await publish(producer, topics.STUDIES_RECEIVED, envelope, key=study.study_instance_uid)
    refused = Envelope.wrap(
        StudyReceived(study_instance_uid="1.2.3", location="/etc", cohort=cohort["name"]),
        source="orthanc",
    )
    await publish(producer, topics.STUDIES_RECEIVED, refused)

    async def scoped_jobs() -> list[dict[str, Any]] | None:
        found = (await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()
        return found or None

    found = await eventually(scoped_jobs)
    assert sorted(j["stage"] for j in found) == ["export", "extraction", "sorting"]

    async def refusal_recorded() -> asyncpg.Record | None:
        async with db.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM gateway.received_studies WHERE event_id = $1", refused.id
            )

    row = await eventually(refusal_recorded)
    assert "outside" in row["refused_reason"]
    async with db.acquire() as conn:
        accepted = await conn.fetchval(
            "SELECT count(*) FROM gateway.received_studies WHERE event_id = $1", envelope.id
        )
    assert accepted == 1  # the redelivery was recognised
    received = (await api.get(f"/api/studies?cohort_id={cohort['id']}")).json()
    assert [(r["origin"], r["study_instance_uid"]) for r in received] == [
        ("kafka", study.study_instance_uid)
    ]
    refusals = (await api.get("/api/studies?refused=true&limit=1000")).json()
    assert any(r["event_id"] == str(refused.id) for r in refusals)
    assert all(r["refused_reason"] for r in refusals)
    assert len((await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()) == 3


def cloudevent_headers(source: str, event_id: str, uid: str, kind: str = "available") -> dict:
    return {
        "ce-specversion": "1.0",
        "ce-type": f"org.example.pacs.study.{kind}.v1",
        "ce-source": source,
        "ce-id": event_id,
        "ce-subject": uid,
        "content-type": "application/json",
    }


async def test_cloudevent_notices_are_processed_once(
    api: httpx.AsyncClient, data_root: Path, db: asyncpg.Pool
) -> None:
    """Binary and structured CloudEvents over HTTP; the same (source, id) again, or the same files
    of the same study under a new id, start nothing; grown files start a new run; each notice is
    in the log with what came of it; a whole-cohort run waits for the study runs."""
    cohort = await new_cohort(api, data_root)
    folder = data_root / unique("incoming")
    folder.mkdir()
    (folder / "IM0001").write_bytes(b"first")
    uid = "1.2.826.0.1.3680043.8.498.31"
    data = {
        "location": str(folder),
        "cohort": cohort["name"],
        "patient_id": "PAT-SECRET-77",
        "accession_number": "ACC-SECRET-88",
        "modalities": ["MR"],
        "expected_instances": 1,
        "complete": True,
        "origin": {"system": "orthanc-1", "calling_ae": "MRI3T", "called_ae": "CF"},
    }
    source = f"/tests/{unique('orthanc')}"
    first = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "1", uid)
    )
    assert first.status_code == 202, first.text
    assert first.json()["outcome"] == "accepted" and len(first.json()["jobs"]) == 3
    resent = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "1", uid)
    )
    assert resent.status_code == 200 and resent.json()["outcome"] == "duplicate"
    assert resent.json()["run_id"] == first.json()["run_id"]
    structured = {
        "specversion": "1.0",
        "type": "org.example.pacs.study.available.v1",
        "source": source,
        "id": "2",  # another notice, but the same files of the same study
        "subject": uid,
        "data": data,
    }
    same_files = await api.post(
        "/api/events",
        content=json.dumps(structured),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert same_files.status_code == 200 and same_files.json()["outcome"] == "duplicate"

    # a whole-cohort run would read the study half-way through its own stages
    busy = await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})
    assert busy.status_code == 409 and "new study is still being processed" in busy.text

    (folder / "IM0002").write_bytes(b"second delivery")
    grown = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "3", uid)
    )
    assert grown.status_code == 202 and grown.json()["outcome"] == "accepted"
    assert grown.json()["run_id"] != first.json()["run_id"]

    bad = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "4", "")
    )
    assert bad.status_code == 422 and "subject" in bad.json()["detail"]
    wrong_type = {**cloudevent_headers(source, "5", uid), "ce-type": "org.example.other"}
    refused = await api.post("/api/events", content=json.dumps(data), headers=wrong_type)
    assert refused.status_code == 422 and "study.available.v1" in refused.json()["detail"]
    retracted = await api.post(
        "/api/events",
        content=json.dumps(data),
        headers=cloudevent_headers(source, "6", uid, kind="retracted"),
    )
    assert retracted.status_code == 200 and retracted.json()["outcome"] == "retracted"

    log = (await api.get(f"/api/studies?cohort_id={cohort['id']}")).json()
    outcomes = [(r["notice_id"], r["outcome"], r["files"]) for r in reversed(log)]
    assert outcomes == [("1", "accepted", 1), ("1", "duplicate", 1), ("2", "duplicate", 1),
                        ("3", "accepted", 2), ("6", "retracted", None)]  # fmt: skip
    assert log[-1]["sender"] == data["origin"] and log[-1]["notice_source"] == source
    assert log[2]["duplicate_of"] == log[-1]["seq"]
    duplicates = (await api.get(f"/api/studies?cohort_id={cohort['id']}&outcome=duplicate")).json()
    assert len(duplicates) == 2
    jobs = (await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()
    assert len(jobs) == 6  # two runs of three stages: the first delivery and the grown study
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT row_to_json(r)::text AS j FROM gateway.received_studies r")
    kept = "".join(r["j"] for r in rows)
    assert "PAT-SECRET-77" not in kept and "ACC-SECRET-88" not in kept


async def test_a_retracted_study_leaves_the_next_export_until_it_is_available_again(
    api: httpx.AsyncClient, data_root: Path, db: asyncpg.Pool, producer: AIOKafkaProducer
) -> None:
    cohort = await new_cohort(api, data_root, study_quiet_period_s=0)
    source, uid = "/hospital/pacs-r", f"1.2.826.0.1.{uuid.uuid4().int % 10**12}"
    folder = data_root / "study-a" / unique("retract")
    folder.mkdir()
    (folder / "IM0001").write_bytes(b"first")
    data = {"location": str(folder), "cohort": cohort["name"], "complete": True}
    available = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "a1", uid)
    )
    assert available.status_code == 202, available.text

    async def retracted_view() -> dict[str, str]:
        async with db.acquire() as conn:
            rows = await conn.fetch(
                "SELECT study_instance_uid, reason FROM gateway.retracted_studies_v"
                " WHERE cohort_id = $1",
                uuid.UUID(cohort["id"]),
            )
        return {r["study_instance_uid"]: r["reason"] for r in rows}

    # no cohort named: the one the study was accepted into
    retraction = {"location": str(folder), "reason": "consent withdrawn"}
    response = await api.post(
        "/api/events",
        content=json.dumps(retraction),
        headers=cloudevent_headers(source, "r1", uid, kind="retracted"),
    )
    assert response.status_code == 200, response.text
    assert (response.json()["outcome"], response.json()["cohort_id"]) == ("retracted", cohort["id"])
    assert await retracted_view() == {uid: f"retracted by {source}: consent withdrawn"}
    resent = await api.post(
        "/api/events",
        content=json.dumps(retraction),
        headers=cloudevent_headers(source, "r1", uid, kind="retracted"),
    )
    assert resent.status_code == 200 and resent.json()["outcome"] == "duplicate"

    unknown = await api.post(
        "/api/events",
        content=json.dumps(retraction),
        headers=cloudevent_headers(source, "r2", "1.2.3.999", kind="retracted"),
    )
    assert unknown.status_code == 422 and "name the cohort" in unknown.json()["detail"]
    # an anonymized cohort: the anonymizer is asked (ADR 0025), the original UID sealed, and the
    # sender's free text stays behind; the gateway's own view holds nothing of it
    anonymized = await new_cohort(api, data_root, anonymization=True)
    forwarded = await api.post(
        "/api/events",
        content=json.dumps({**retraction, "cohort": anonymized["name"]}),
        headers=cloudevent_headers(source, "r3", uid, kind="retracted"),
    )
    assert forwarded.status_code == 200 and forwarded.json()["outcome"] == "retracted"
    async with db.acquire() as conn:
        asked = await conn.fetch(
            "SELECT envelope::text AS envelope FROM gateway.outbox WHERE topic = $1"
            " AND envelope ->> 'cohort_id' = $2",
            topics.STUDY_RETRACTIONS,
            anonymized["id"],
        )
        anonymized_view = await conn.fetchval(
            "SELECT count(*) FROM gateway.retracted_studies_v WHERE cohort_id = $1",
            uuid.UUID(anonymized["id"]),
        )
    assert len(asked) == 1 and anonymized_view == 0
    assert uid not in asked[0]["envelope"] and "consent withdrawn" not in asked[0]["envelope"]
    message = Envelope.model_validate_json(asked[0]["envelope"]).open(StudyRetraction)
    assert message.retracted and message.reason.startswith(f"retracted by {source} (notice ")

    # an anonymized cohort whose UIDs were kept (retain_uids): its catalog holds the original, so
    # the gateway's view holds the retraction too (without the sender's words)
    kept = await new_cohort(api, data_root, anonymization=True)
    config = {"retain_uids": True, "audit_export": {"format": "csv", "password": PASSWORD}}
    started = await api.post(
        f"/api/cohorts/{kept['id']}/stages/anonymization/run", json={"config": config}
    )
    assert started.status_code == 202, started.text
    anonymization = started.json()["id"]
    done = StageCompleted(
        stage=Stage.anonymization, cohort=ref(kept), items_total=1, items_done=1, items_failed=0,
        summary={}, output_prefix=f"anon/{kept['id']}",
    )  # fmt: skip
    await publish(
        producer, topics.completed(Stage.anonymization), event(done, kept["id"], anonymization)
    )

    async def anonymized_done() -> bool:
        return (await api.get(f"/api/jobs/{anonymization}")).json()["status"] == "completed"

    await eventually(anonymized_done)
    retained = await api.post(
        "/api/events",
        content=json.dumps({**retraction, "cohort": kept["name"]}),
        headers=cloudevent_headers(source, "r4", uid, kind="retracted"),
    )
    assert retained.status_code == 200 and retained.json()["outcome"] == "retracted"
    async with db.acquire() as conn:
        kept_view = await conn.fetch(
            "SELECT study_instance_uid, reason FROM gateway.retracted_studies_v"
            " WHERE cohort_id = $1",
            uuid.UUID(kept["id"]),
        )
    assert [tuple(r) for r in kept_view] == [
        (uid, f"retracted by {source} (notice {retained.json()['notice']})")
    ]

    # available again (the same files: a duplicate run-wise, but the retraction no longer holds)
    again = await api.post(
        "/api/events", content=json.dumps(data), headers=cloudevent_headers(source, "a2", uid)
    )
    assert again.status_code in (200, 202), again.text
    assert await retracted_view() == {}
    log = (await api.get(f"/api/studies?cohort_id={cohort['id']}&outcome=retracted")).json()
    assert [r["notice_id"] for r in log] == ["r1"]


async def test_cloudevents_on_kafka_binary_mode(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer
) -> None:
    cohort = await new_cohort(api, data_root)
    uid = "1.2.826.0.1.3680043.8.498.32"
    source = f"/tests/{unique('router')}"
    data = {"location": str(data_root / "new-study"), "cohort": cohort["name"], "complete": True}
    headers = [
        (name.replace("ce-", "ce_"), value.encode())
        for name, value in cloudevent_headers(source, "k-1", uid).items()
    ]
    for _ in range(2):  # a router that resends
        await producer.send_and_wait(
            topics.STUDIES_RECEIVED, json.dumps(data).encode(), key=uid.encode(), headers=headers
        )

    async def logged() -> list[dict[str, Any]] | None:
        found = (await api.get(f"/api/studies?cohort_id={cohort['id']}")).json()
        return found if len(found) == 2 else None

    log = await eventually(logged)
    assert sorted(r["outcome"] for r in log) == ["accepted", "duplicate"]
    assert {r["origin"] for r in log} == {"kafka"}
    assert len((await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json()) == 3


async def test_routing_rules_choose_the_cohort_of_an_unnamed_study(
    api: httpx.AsyncClient, data_root: Path, dicom_root: Path
) -> None:
    """Rules on the sender and on the study's own header (read from its first DICOM file when the
    notice does not say) route a notice that names no cohort; ties and misses are refused."""
    memory, oncology = await new_cohort(api, data_root), await new_cohort(api, data_root)
    mr_file = next(
        p
        for p in sorted((dicom_root / "dcm_qa_nih" / "In").rglob("*"))
        if p.is_file() and pydicom.misc.is_dicom(p)
    )
    folder = data_root / unique("routed")
    folder.mkdir()
    shutil.copy(mr_file, folder / "IM0001")
    base = f"/api/cohorts/{memory['id']}/routing-rules"
    assert (await api.post(base, json={"priority": 1})).status_code == 422
    by_header = await api.post(base, json={"modality": ["MR"], "institution": "nih*"})
    assert by_header.status_code == 201, by_header.text
    by_sender = await api.post(
        f"/api/cohorts/{oncology['id']}/routing-rules",
        json={"source": "/tests/onco-*", "priority": 10},
    )
    assert by_sender.status_code == 201
    assert [r["id"] for r in (await api.get(base)).json()] == [by_header.json()["id"]]

    async def send(source: str, event_id: str) -> httpx.Response:
        headers = cloudevent_headers(source, event_id, f"1.2.826.0.1.3680043.8.498.{event_id}")
        return await api.post(
            "/api/events",
            content=json.dumps({"location": str(folder), "complete": True}),
            headers=headers,
        )

    to_memory = await send(f"/tests/{unique('pacs')}", "41")  # the header says MR at NIH
    assert to_memory.status_code == 202, to_memory.text
    assert to_memory.json()["cohort_id"] == memory["id"]
    to_oncology = await send(f"/tests/onco-{unique('x')}", "42")  # priority 10 beats 100
    assert to_oncology.json()["cohort_id"] == oncology["id"]
    tie = await api.post(
        f"/api/cohorts/{memory['id']}/routing-rules",
        json={"source": "/tests/onco-*", "priority": 10},
    )
    ambiguous = await send(f"/tests/onco-{unique('x')}", "43")
    assert ambiguous.status_code == 422 and "hold at priority 10" in ambiguous.text
    await api.delete(f"{base}/{tie.json()['id']}")
    await api.delete(f"{base}/{by_header.json()['id']}")
    missed = await send(f"/tests/{unique('pacs')}", "44")
    assert missed.status_code == 422 and "routing rules holds" in missed.text
    assert (await api.delete(f"{base}/{by_header.json()['id']}")).status_code == 404


async def test_a_study_without_completeness_waits_for_its_quiet_period(
    api: httpx.AsyncClient, data_root: Path, db: asyncpg.Pool
) -> None:
    """A notice that does not say the study is complete waits until the files stop changing for
    the cohort's quiet period; resends while it waits are duplicates; a later notice that says
    "complete" starts at once; a count of expected files reached counts as complete."""
    cohort = await new_cohort(api, data_root, study_quiet_period_s=2)
    assert cohort["study_quiet_period_s"] == 2
    folder = data_root / unique("arriving")
    folder.mkdir()
    (folder / "IM0001").write_bytes(b"one")
    body = {"study_instance_uid": "1.2.826.0.1.3680043.8.498.51", "location": str(folder),
            "cohort": cohort["id"]}  # fmt: skip
    first = await api.post("/api/studies", json=body)
    assert first.status_code == 202 and first.json()["outcome"] == "waiting", first.text
    assert first.json()["jobs"] == []
    again = await api.post("/api/studies", json=body)
    assert again.json()["outcome"] == "duplicate"
    assert again.json()["duplicate_of"] == first.json()["notice"]
    await asyncio.sleep(1.2)
    (folder / "IM0002").write_bytes(b"two")  # the second piece arrives: the wait starts again
    await asyncio.sleep(1.2)
    assert (await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json() == []

    async def started() -> list[dict[str, Any]] | None:
        return (await api.get(f"/api/jobs?cohort_id={cohort['id']}")).json() or None

    jobs = await eventually(started)
    assert len(jobs) == 3
    log = {r["seq"]: r for r in (await api.get(f"/api/studies?cohort_id={cohort['id']}")).json()}
    waited = log[first.json()["notice"]]
    assert waited["outcome"] == "accepted" and waited["files"] == 2
    assert waited["run_id"] == jobs[0]["run_id"]

    # a study whose sender says "complete" later: no waiting, the waiting notice is settled
    other = {**body, "study_instance_uid": "1.2.826.0.1.3680043.8.498.52"}
    other_folder = data_root / unique("arriving")
    other_folder.mkdir()
    (other_folder / "IM0001").write_bytes(b"one")
    other["location"] = str(other_folder)
    waiting = (await api.post("/api/studies", json=other)).json()
    assert waiting["outcome"] == "waiting"
    done = await api.post("/api/studies", json={**other, "complete": True})
    assert done.status_code == 202 and done.json()["outcome"] == "accepted"
    async with db.acquire() as conn:
        settled = await conn.fetchrow(
            "SELECT outcome, duplicate_of FROM gateway.received_studies WHERE seq = $1",
            waiting["notice"],
        )
    assert tuple(settled) == ("duplicate", done.json()["notice"])
    counted = {**other, "study_instance_uid": "1.2.826.0.1.3680043.8.498.53"}
    by_count = await api.post("/api/studies", json={**counted, "expected_instances": 1})
    assert by_count.json()["outcome"] == "accepted"


class Receiver:
    """A real HTTP endpoint that checks every webhook's Standard Webhooks signature; it answers
    500 to the first request, to be retried."""

    def __init__(self) -> None:
        self.secret = ""
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.bad_signatures = 0
        self.refused_first = False
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(receiver.secret).verify(body, headers)
                except WebhookVerificationError:
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if not receiver.refused_first:
                    receiver.refused_first = True
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.received.append((headers, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self) -> list[str]:
        return [event["type"] for _, event in self.received]


async def test_events_go_out_as_cloudevents_and_signed_webhooks(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer, settings: Settings
) -> None:
    receiver = Receiver()
    try:
        bad = await api.post("/api/webhooks", json={"url": receiver.url, "event_types": ["x"]})
        assert bad.status_code == 422 and "unknown event names" in bad.text
        created = await api.post(
            "/api/webhooks",
            json={"url": receiver.url, "event_types": ["job.started", "job.completed"]},
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        receiver.secret = hook["secret"]
        assert hook["secret"].startswith("whsec_")
        listed = (await api.get("/api/webhooks")).json()
        assert all("secret" not in h for h in listed) and hook["id"] in {h["id"] for h in listed}

        cohort = await new_cohort(api, data_root)
        run = await api.post(f"/api/cohorts/{cohort['id']}/stages/extraction/run", json={})
        extraction = run.json()["id"]
        progress = JobProgress(stage=Stage.extraction, items_total=2, items_done=1)
        await publish(producer, topics.JOBS_PROGRESS, event(progress, cohort["id"], extraction))

        async def running() -> bool:
            return (await job(api, extraction))["status"] == "running"

        await eventually(running)  # progress and completion travel on different topics
        done = StageCompleted(
            stage=Stage.extraction, cohort=ref(cohort), items_total=2, items_done=2,
            items_failed=0, summary={}, output_prefix=None,
        )  # fmt: skip
        await publish(
            producer, topics.completed(Stage.extraction), event(done, cohort["id"], extraction)
        )

        async def both() -> bool:
            return len(receiver.received) >= 2

        await eventually(both)
        # a retried delivery may arrive after a later event: receivers order by the event's time
        assert sorted(receiver.types()) == [
            "org.cohortflow.job.completed.v1",
            "org.cohortflow.job.started.v1",
        ]
        assert receiver.bad_signatures == 0
        headers, completed = next(r for r in receiver.received if "completed" in r[1]["type"])
        assert completed["subject"] == extraction and completed["data"]["status"] == "completed"
        assert headers["webhook-id"] == completed["id"]

        deliveries = (await api.get(f"/api/webhooks/{hook['id']}/deliveries")).json()
        assert {d["status"] for d in deliveries} == {"delivered"}
        started = next(d for d in deliveries if d["event_type"] == "job.started")
        assert started["attempts"] == 2  # the receiver's 500, then the retry
        replay = await api.post(f"/api/webhooks/{hook['id']}/deliveries/{started['id']}/replay")
        assert replay.status_code == 202

        async def replayed() -> bool:
            return len(receiver.received) == 3

        await eventually(replayed)
        assert receiver.received[2][0]["webhook-id"] == started["event_id"]

        # the same events on the outbound topic, as CloudEvents in binary mode
        consumer = AIOKafkaConsumer(
            topics.EVENTS_OUT, bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest", enable_auto_commit=False,
        )  # fmt: skip
        await consumer.start()
        try:
            deadline = time.monotonic() + 20
            found: dict[str, str] = {}
            while time.monotonic() < deadline and not found:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        attrs = {k: v.decode() for k, v in record.headers}
                        if attrs.get("ce_subject") == extraction and attrs["ce_type"].endswith(
                            "job.completed.v1"
                        ):
                            found = attrs
                            assert json.loads(record.value)["job_id"] == extraction
        finally:
            await consumer.stop()
        assert found["ce_specversion"] == "1.0" and found["ce_source"] == "/cohortflow/gateway"
        assert (await api.delete(f"/api/webhooks/{hook['id']}")).status_code == 204
        assert (await api.delete(f"/api/webhooks/{hook['id']}")).status_code == 404
    finally:
        receiver.server.shutdown()


# --- catalog and exports, against the published views of the other services -------------------


STAND_INS = {
    "SERIES_VIEW": """series_v (cohort_id uuid, subject_id text, study_instance_uid text,
        series_instance_uid text, series_number int, series_description text, modality text,
        n_instances int)""",
    "STACK_VIEW": """stack_v (cohort_id uuid, series_instance_uid text, stack_key text,
        n_instances int, n_frames int)""",
    "CLASSIFICATION_VIEW": """classification_v (cohort_id uuid, series_instance_uid text,
        stack_key text, base text, technique text, modifiers text[], constructs text[],
        provenance text, acceleration text[], post_contrast bool, localizer bool, spinal_cord bool,
        intent text, bids_datatype text, bids_suffix text, entities jsonb, confidence float8,
        review_required bool, review_reasons text[])""",
    "MANIFEST_VIEW": """manifest_v (cohort_id uuid, job_id uuid, path text, object_key text,
        kind text, size bigint, sha256 text, series_instance_uid text, stack_key text,
        source_sop_instance_uids text[])""",
}


class StandIns:
    """Tables with the agreed columns of the other services' views, in a schema of their own, so
    the real `catalog`/`sorting`/`export` schemas (or their absence) are left alone."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool, self.schema = pool, schema

    async def create(self, *views: str) -> None:
        async with self.pool.acquire() as conn:
            for view in views:
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {self.schema}.{STAND_INS[view]}")

    def name(self, view: str) -> str:
        return f"{self.schema}.{STAND_INS[view].split(' ', 1)[0]}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def views(db: asyncpg.Pool) -> AsyncIterator[StandIns]:
    schema = f"gw_views_{uuid.uuid4().hex[:8]}"
    async with db.acquire() as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    stand_ins = StandIns(db, schema)
    with pytest.MonkeyPatch.context() as patch:
        for view in STAND_INS:
            patch.setattr(gateway_catalog, view, stand_ins.name(view))
        yield stand_ins
    async with db.acquire() as conn:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_series_with_stacks_and_classification(
    api: httpx.AsyncClient, views: StandIns, db: asyncpg.Pool, data_root: Path
) -> None:
    cohort = await new_cohort(api, data_root)
    url = f"/api/cohorts/{cohort['id']}/series"
    assert (await api.get(url)).json() == []  # no catalog yet: nothing, not an error

    cid = uuid.UUID(cohort["id"])
    await views.create("SERIES_VIEW", "STACK_VIEW")
    async with db.acquire() as conn:
        await conn.executemany(
            f"INSERT INTO {views.name('SERIES_VIEW')} VALUES ($1, 'sub-1', '1.1', $2, $3, $4, 'MR', $5)",
            [(cid, "1.1.1", 1, "t1_mprage", 176), (cid, "1.1.2", 2, "ep2d_diff", 60)],
        )
        await conn.executemany(
            f"INSERT INTO {views.name('STACK_VIEW')} VALUES ($1, $2, $3, $4, $5)",
            [
                (cid, "1.1.1", "MR|TE=2.46|TI=900|FA=9|ECHO=1|PART=M|ORIENT=SAG", 176, 176),
                (cid, "1.1.2", "MR|TE=89|ECHO=1|PART=M|ORIENT=AX", 60, 60),
            ],
        )
    series = (await api.get(url)).json()
    assert [s["series_instance_uid"] for s in series] == ["1.1.1", "1.1.2"]
    assert series[0]["description"] == "t1_mprage" and series[0]["modality"] == "MR"
    stack = series[0]["stacks"][0]
    assert stack["stack_key"].startswith("MR|TE=2.46") and stack["n_instances"] == 176
    assert stack["base"] is None and stack["bids_suffix"] is None  # not sorted yet

    await views.create("CLASSIFICATION_VIEW")
    async with db.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {views.name('CLASSIFICATION_VIEW')} VALUES ($1, '1.1.1', $2, 'T1w', 'MPRAGE',"
            " '{}', '{}', 'raw', '{GRAPPA}', false, false, false, 'anat', 'anat', 'T1w',"
            " '{\"acq\": \"mprage\"}', 0.97, false, '{}')",
            cid,
            "MR|TE=2.46|TI=900|FA=9|ECHO=1|PART=M|ORIENT=SAG",
        )
    series = (await api.get(url)).json()
    stack = series[0]["stacks"][0]
    assert (stack["base"], stack["technique"], stack["bids_suffix"]) == ("T1w", "MPRAGE", "T1w")
    assert stack["acceleration"] == ["GRAPPA"] and stack["confidence"] == pytest.approx(0.97)
    assert stack["entities"] == {"acq": "mprage"} and stack["review_required"] is False
    assert series[1]["stacks"][0]["base"] is None
    assert len((await api.get(f"{url}?limit=1&offset=1")).json()) == 1
    assert (await api.get(f"{url}?limit=0")).status_code == 422


async def test_export_listing_and_download(
    api: httpx.AsyncClient,
    views: StandIns,
    db: asyncpg.Pool,
    data_root: Path,
    settings: Settings,
) -> None:
    cohort = await new_cohort(api, data_root)
    jobs = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"]
    export_job = jobs[-1]["id"]
    url = f"/api/cohorts/{cohort['id']}/exports/{export_job}"
    listing = (await api.get(url)).json()
    assert listing["files"] == [] and listing["status"] == "pending"  # no manifest view yet
    await views.create("MANIFEST_VIEW")

    listing = (await api.get(url)).json()
    assert listing["files"] == [] and listing["status"] == "pending"

    store = ObjectStore(settings)
    content = json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}).encode() * 1000
    key = f"export/{cohort['id']}/{export_job}/dataset_description.json"
    digest = await asyncio.to_thread(store.put_bytes, key, content)
    nifti_key = f"export/{cohort['id']}/{export_job}/sub-1/anat/sub-1_T1w.nii.gz"
    await asyncio.to_thread(store.put_bytes, nifti_key, b"\x1f\x8b" + b"\0" * 100)
    async with db.acquire() as conn:
        await conn.executemany(
            f"INSERT INTO {views.name('MANIFEST_VIEW')} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [
                (
                    uuid.UUID(cohort["id"]),
                    uuid.UUID(export_job),
                    "dataset_description.json",
                    key,
                    "metadata",
                    len(content),
                    digest,
                    None,
                    None,
                    None,
                ),
                (
                    uuid.UUID(cohort["id"]),
                    uuid.UUID(export_job),
                    "sub-1/anat/sub-1_T1w.nii.gz",
                    nifti_key,
                    "nifti",
                    102,
                    None,
                    "1.1.1",
                    "MR|ECHO=1",
                    ["1.1.1.1", "1.1.1.2"],
                ),
            ],
        )
    files = (await api.get(url)).json()["files"]
    assert [f["path"] for f in files] == ["dataset_description.json", "sub-1/anat/sub-1_T1w.nii.gz"]
    assert files[1]["source_sop_instance_uids"] == ["1.1.1.1", "1.1.1.2"]

    download = await api.get(files[0]["download_url"])
    assert download.status_code == 200
    assert download.content == content
    assert download.headers["x-checksum-sha256"] == digest
    nifti = await api.get(f"{url}/files/sub-1/anat/sub-1_T1w.nii.gz")
    assert nifti.status_code == 200 and nifti.content.startswith(b"\x1f\x8b")
    assert nifti.headers["content-type"] == "application/gzip"

    assert (await api.get(f"{url}/files/../../etc/passwd")).status_code == 404
    assert (await api.get(f"{url}/files/sub-1/missing.nii.gz")).status_code == 404
    not_export = f"/api/cohorts/{cohort['id']}/exports/{jobs[0]['id']}"
    assert (await api.get(not_export)).status_code == 404
    assert (await api.get(f"/api/cohorts/{uuid.uuid4()}/exports/{export_job}")).status_code == 404


async def test_poison_events_are_skipped_not_retried_forever(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer
) -> None:
    cohort = await new_cohort(api, data_root)
    first = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"][0]
    topic = topics.completed(Stage.extraction)
    await producer.send_and_wait(topic, b"this is not an envelope")
    broken = Envelope(
        type="StageCompleted",
        source="test",
        job_id=uuid.UUID(first["id"]),
        payload={"stage": "extraction"},  # counts and cohort missing
    )
    await publish(producer, topic, broken)
    done = StageCompleted(
        stage=Stage.extraction, cohort=ref(cohort), items_total=1, items_done=1, items_failed=0
    )
    await publish(producer, topic, event(done, cohort["id"], first["id"]))

    async def completed() -> bool:
        return (await job(api, first["id"]))["status"] == "completed"

    await eventually(completed)

    async def counted() -> bool:
        # unkeyed messages land on any partition: the broken one may be read after the good one
        metrics = (await api.get("/metrics")).text
        return all(
            f'cohortflow_gateway_events_total{{outcome="{outcome}",type="StageCompleted"}}'
            in metrics
            for outcome in ("skipped", "applied")
        )

    await eventually(counted)


# --- the web page, in a real browser ------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(gateway: FastAPI) -> AsyncIterator[str]:
    """The same running app behind a real HTTP server, for the browser."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(gateway, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.mark.e2e
async def test_web_page_creates_a_cohort_and_follows_its_jobs(
    served: str, data_root: Path, api: httpx.AsyncClient
) -> None:
    chromium = shutil.which("chromium")
    # scripts/bootstrap installs it; a missing browser is a broken setup, not a reason to skip
    assert chromium is not None, "Debian chromium is not installed (scripts/bootstrap installs it)"
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        page = await browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        try:
            await page.goto(served + "/")
            await expect(page.locator("#token-view")).to_be_visible()
            # a wrong token is said to be wrong, not silently asked for again
            await page.fill("#token-input", "not-the-token")
            await page.click("#token-form button")
            await expect(page.locator("#token-problem")).to_contain_text("refused")
            await page.fill("#token-input", TOKEN)
            await page.click("#token-form button")
            await expect(page.locator("#home-view")).to_be_visible()

            name = unique("web")
            await page.click("#new-cohort")
            await page.fill("#cohort-form [name=name]", name)
            await page.fill("#cohort-form [name=source_path]", "/etc")
            await page.click("#cohort-form button[type=submit]")
            await expect(page.locator("#cohort-form .form-problem")).to_contain_text(
                "outside the allowed data roots"
            )
            await page.fill("#cohort-form [name=source_path]", str(data_root / "study-a"))
            await page.fill("#cohort-form [name=tags]", "web, test")
            await page.click("#cohort-form button[type=submit]")
            await expect(page.locator("#cohort-name")).to_have_text(name)
            await expect(page.locator("#stage-table tbody tr")).to_have_count(3)

            await page.click("#pipeline-box summary")
            await page.locator("#pipeline-form summary", has_text="Sorting").click()
            await page.select_option("#pipeline-form [name='sorting.profile']", '"research"')
            await page.click("#run-pipeline")
            await expect(page.locator("#notices")).to_contain_text("Extraction")
            await expect(page.locator("#cohort-status")).to_contain_text("running")
            await expect(page.locator("#cohort-list li.active")).to_contain_text("running")
            await expect(page.locator("#stage-table button", has_text="Cancel")).to_have_count(3)

            # cancelled from its job page; the sidebar then says "cancelled", not "idle"
            await page.locator("#stage-table tbody tr").first.locator("a").click()
            await expect(page.locator("#job-config")).to_contain_text("{")
            await page.click("#cancel-job")
            await expect(page.locator("#job-status")).to_have_text("cancelled")
            await expect(page.locator("#job-progress")).to_be_attached()
            await expect(page.locator("#cohort-list")).to_contain_text("cancelled")

            # an export file list from signed links that open without the token header
            link = (await api.post("/api/download-links", json={"path": "/api/cohorts"})).json()
            async with httpx.AsyncClient(base_url=served) as bare:
                assert (await bare.get("/api/cohorts")).status_code == 401
                assert (await bare.get(link["url"])).status_code == 200
            await page.click("#home-link")
            await expect(page.locator("#cohort-list")).to_contain_text(name)
        finally:
            await browser.close()
    assert problems == []
    cohorts = (await api.get("/api/cohorts")).json()
    created = next(c for c in cohorts if c["name"] == name)
    assert created["tags"] == ["web", "test"]


# --- dead letters ------------------------------------------------------------------------------


async def test_dead_letters_are_kept_listed_replayed_and_discarded(
    api: httpx.AsyncClient, data_root: Path, producer: AIOKafkaProducer, settings: Settings
) -> None:
    """Letters from the stage dead-letter topics land in the API; a replay starts a new run of
    the letter's stage and the stages after it, with the config the item carried; a letter of a
    message that never was one can only be discarded."""
    cohort = await new_cohort(api, data_root)
    jobs = (await api.post(f"/api/cohorts/{cohort['id']}/pipeline", json={})).json()["jobs"]
    extraction, sorting, _export = (j["id"] for j in jobs)
    done = StageCompleted(
        stage=Stage.extraction, cohort=ref(cohort), items_total=1, items_done=1, items_failed=0
    )
    await publish(
        producer, topics.completed(Stage.extraction), event(done, cohort["id"], extraction)
    )
    await publish(
        producer,
        topics.JOBS_PROGRESS,
        event(JobProgress(stage=Stage.sorting, items_total=2), cohort["id"], sorting),
    )
    item = WorkItem(
        stage=Stage.sorting,
        cohort=ref(cohort),
        item_key="stack-7",
        config={"profile": "replayed"},
        data={"series": "1.2.3"},
    )
    letter = DeadLetter(
        topic=topics.items(Stage.sorting),
        error="RuntimeError: boom",
        attempts=3,
        original=item.model_dump(mode="json"),
    )
    item_letter = event(letter, cohort["id"], sorting, source="sorter")
    await publish(producer, topics.dlq(Stage.sorting), item_letter, key="stack-7")
    await publish(producer, topics.dlq(Stage.sorting), item_letter, key="stack-7")  # redelivered
    junk = DeadLetter(
        topic=topics.items(Stage.sorting),
        error="not a valid envelope",
        attempts=1,
        original={"raw": "garbage\x00tail"},  # jsonb cannot hold a NUL: kept escaped
    )
    junk_letter = Envelope.wrap(junk, source="sorter")
    await publish(producer, topics.dlq(Stage.sorting), junk_letter)

    async def both_kept() -> list[dict[str, Any]] | None:
        found = (await api.get("/api/dead-letters", params={"stage": "sorting"})).json()
        ids = {d["id"] for d in found}
        return found if {str(item_letter.id), str(junk_letter.id)} <= ids else None

    await eventually(both_kept)
    mine = (await api.get("/api/dead-letters", params={"cohort_id": cohort["id"]})).json()
    assert [(d["id"], d["kind"], d["item_key"], d["status"]) for d in mine] == [
        (str(item_letter.id), "item", "stack-7", "open")
    ], "kept once, with its cohort, job and item"
    assert mine[0]["job_id"] == sorting and mine[0]["error"] == "RuntimeError: boom"
    shown = (await api.get(f"/api/dead-letters/{item_letter.id}")).json()
    assert shown["original"]["item_key"] == "stack-7" and shown["attempts"] == 3
    assert (await api.get(f"/api/dead-letters/{uuid.uuid4()}")).status_code == 404
    assert (await api.get("/api/dead-letters", params={"status": "lost"})).status_code == 422

    # the job still runs: its other items may succeed, so no replay yet
    early = await api.post(f"/api/dead-letters/{item_letter.id}/replay")
    assert early.status_code == 409 and "replay once it has ended" in early.json()["detail"]

    failure = StageFailed(
        stage=Stage.sorting, cohort=ref(cohort), error="every item failed", items_total=1
    )
    await publish(producer, topics.failed(Stage.sorting), event(failure, cohort["id"], sorting))

    async def sorting_failed() -> bool:
        return (await job(api, sorting))["status"] == "failed"

    await eventually(sorting_failed)
    replayed = await api.post(f"/api/dead-letters/{item_letter.id}/replay")
    assert replayed.status_code == 202, replayed.text
    run = replayed.json()
    assert [j["stage"] for j in run["jobs"]] == ["sorting", "export"]
    new_sorting = run["jobs"][0]["id"]
    request_env = await find_on_topic(
        settings, topics.requested(Stage.sorting), lambda e: str(e.job_id) == new_sorting
    )
    request = request_env.open(StageRequested)
    assert request.config == {"profile": "replayed"}, "the config the item was sent with"
    assert [s.stage for s in request.slip] == [Stage.export]
    assert str(request_env.correlation_id) == run["run_id"]
    after = (await api.get(f"/api/dead-letters/{item_letter.id}")).json()
    assert (after["status"], after["replay_run_id"]) == ("replayed", run["run_id"])
    again = await api.post(f"/api/dead-letters/{item_letter.id}/replay")
    assert again.status_code == 409

    kept_junk = (await api.get(f"/api/dead-letters/{junk_letter.id}")).json()
    assert (kept_junk["kind"], kept_junk["original"]) == ("message", {"raw": "garbage\\x00tail"})
    refused = await api.post(f"/api/dead-letters/{junk_letter.id}/replay")
    assert refused.status_code == 409 and "discard" in refused.json()["detail"]
    discarded = await api.post(
        f"/api/dead-letters/{junk_letter.id}/discard", json={"note": "garbage from a test"}
    )
    assert discarded.status_code == 200, discarded.text
    assert (discarded.json()["status"], discarded.json()["note"]) == (
        "discarded",
        "garbage from a test",
    )
    assert (await api.post(f"/api/dead-letters/{junk_letter.id}/discard")).status_code == 409
    gone = (
        await api.get("/api/dead-letters", params={"status": "open", "stage": "sorting"})
    ).json()
    assert str(junk_letter.id) not in {d["id"] for d in gone}
