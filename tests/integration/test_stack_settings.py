"""Probes of a stack's settings and outages against a real local stack of its own, driven through
`cohortflow stack` from shells that export nothing (or something else) each time: the settings it
was created with survive restarts, a changed one is refused unless `--reconfigure`, a body over the
limit is a 413, and Postgres or the broker going away is a 503 with `Retry-After`, all in the API's
`{"detail": ...}` format. (The session stack of conftest.py is left alone: this one is stopped.)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cohortflow.stack import LocalStack
from tests.integration.polling import eventually_blocking

pytestmark = pytest.mark.integration

COHORTFLOW = [sys.executable, "-m", "cohortflow.cli"]
TOKEN = "settings-probe-token"
OTHER_TOKEN = "another-token-entirely"


@dataclass
class OwnStack:
    root: Path
    home: Path
    data: Path
    more: Path

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`cohortflow stack ARGS --home HOME` from a shell exporting only `env` of ours."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
        return subprocess.run(
            [*COHORTFLOW, "stack", *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            env=clean | env,
            timeout=300,
        )

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def gateway(self) -> httpx.Client:
        return httpx.Client(base_url=self.status()["gateway_url"], timeout=30)


@pytest.fixture(scope="module")
def own() -> Iterator[OwnStack]:
    root = Path(tempfile.mkdtemp(prefix="cohortflow-settings-"))
    root.chmod(0o755)  # as root, Postgres runs as another user that must reach its folder
    stack = OwnStack(root, root / "state", root / "data", root / "more")
    for folder in (stack.data / "study", stack.more / "study"):
        folder.mkdir(parents=True)
    first = stack.cli(
        "up", "-s", "gateway", "--json", COHORTFLOW_API_TOKEN=TOKEN,
        COHORTFLOW_DATA_ROOTS=str(stack.data),
    )  # fmt: skip
    try:
        assert first.returncode == 0, first.stderr + first.stdout
        yield stack
    finally:
        stack.cli("down")
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _eventually_status(client: httpx.Client, path: str, code: int, timeout: float = 30) -> None:
    eventually_blocking(
        lambda: client.get(path, headers=_auth()).status_code == code,
        timeout,
        0.3,
        f"{path} answering {code}",
    )


def test_settings_are_stored_privately_and_shown_masked(own: OwnStack) -> None:
    stored = own.home / "settings.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    values = json.loads(stored.read_text())["values"]
    assert values["COHORTFLOW_API_TOKEN"] == TOKEN
    assert values["COHORTFLOW_DATA_ROOTS"] == str(own.data)
    shown = own.cli("status", "--json")
    assert TOKEN not in shown.stdout and values["COHORTFLOW_PROJECT_SECRET"] not in shown.stdout
    settings = json.loads(shown.stdout)["settings"]
    assert settings["COHORTFLOW_API_TOKEN"].startswith("(set, sha256 ")
    assert settings["COHORTFLOW_DATA_ROOTS"] == str(own.data)
    table = own.cli("status")
    assert "COHORTFLOW_API_TOKEN" in table.stdout and TOKEN not in table.stdout


def test_a_restart_from_a_clean_shell_keeps_token_and_roots(own: OwnStack) -> None:
    assert own.cli("down").returncode == 0
    again = own.cli("up", "-s", "gateway", "--json")  # no COHORTFLOW_* at all
    assert again.returncode == 0, again.stderr
    with own.gateway() as gateway:
        assert gateway.get("/api/cohorts").status_code == 401  # auth is still on
        assert gateway.get("/api/cohorts", headers=_auth()).status_code == 200
        inside = gateway.post(
            "/api/cohorts",
            json={"name": "inside", "source_path": str(own.data / "study")},
            headers=_auth(),
        )
        assert inside.status_code == 201, inside.text
        elsewhere = gateway.post(
            "/api/cohorts",
            json={"name": "elsewhere", "source_path": str(own.more / "study")},
            headers=_auth(),
        )
        assert elsewhere.status_code == 422 and "outside the allowed data roots" in elsewhere.text


def test_a_changed_setting_is_refused_unless_reconfigured(own: OwnStack) -> None:
    before = own.status()["services"]["gateway"]["pid"]
    refused = own.cli("up", "-s", "gateway", COHORTFLOW_API_TOKEN=OTHER_TOKEN)
    assert refused.returncode == 1
    assert "COHORTFLOW_API_TOKEN" in refused.stderr and "--reconfigure" in refused.stderr
    assert TOKEN not in refused.stderr and OTHER_TOKEN not in refused.stderr
    assert own.status()["services"]["gateway"]["pid"] == before  # nothing was touched

    fixed = own.cli("up", "--reconfigure", COHORTFLOW_PROJECT_SECRET="f" * 64)
    assert fixed.returncode == 1 and "cannot change" in fixed.stderr

    both = os.pathsep.join([str(own.data), str(own.more)])
    changed = own.cli("up", "-s", "gateway", "--reconfigure", COHORTFLOW_DATA_ROOTS=both)
    assert changed.returncode == 0, changed.stderr
    assert own.status()["services"]["gateway"]["pid"] != before  # restarted with the new roots
    with own.gateway() as gateway:
        created = gateway.post(
            "/api/cohorts",
            json={"name": "now-allowed", "source_path": str(own.more / "study")},
            headers=_auth(),
        )
        assert created.status_code == 201, created.text
    # and that is what the next clean restart uses
    assert (
        json.loads((own.home / "settings.json").read_text())["values"]["COHORTFLOW_DATA_ROOTS"]
        == both
    )


def test_a_body_over_the_limit_is_413_before_it_is_parsed(own: OwnStack) -> None:
    limit = int(own.status()["settings"]["COHORTFLOW_API_MAX_BODY_BYTES"])
    body = b'{"name": "' + b"x" * (50 * 1024 * 1024) + b'"}'  # the 50 MB probe
    with own.gateway() as gateway:
        started = time.monotonic()
        declared = gateway.post(
            "/api/cohorts", content=body, headers=_auth() | {"content-type": "application/json"}
        )
        assert declared.status_code == 413, declared.text
        assert declared.headers["content-type"] == "application/json"
        assert str(limit) in declared.json()["detail"]
        assert time.monotonic() - started < 10

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for start in range(0, len(body), 1024 * 1024):
                yield body[start : start + 1024 * 1024]

        streamed = gateway.post(
            "/api/cohorts", content=chunks(), headers=_auth() | {"content-type": "application/json"}
        )
        assert streamed.status_code == 413 and "too large" in streamed.json()["detail"]
        assert gateway.get("/api/cohorts", headers=_auth()).status_code == 200


def test_postgres_down_is_503_with_retry_after_and_recovers(own: OwnStack) -> None:
    LocalStack(own.home).stop_infra("postgres")
    try:
        with own.gateway() as gateway:
            for path in ("/api/cohorts", "/api/jobs"):
                down = gateway.get(path, headers=_auth())
                assert down.status_code == 503, (path, down.status_code, down.text)
                assert down.headers["content-type"] == "application/json"
                assert int(down.headers["retry-after"]) > 0
                assert "unreachable" in down.json()["detail"]
            assert gateway.get("/readyz").status_code == 503
    finally:
        up = own.cli("up", "-s", "gateway")
        assert up.returncode == 0, up.stderr
    with own.gateway() as gateway:
        _eventually_status(gateway, "/api/cohorts", 200)


def test_broker_down_refuses_new_work_with_503_and_recovers(own: OwnStack) -> None:
    with own.gateway() as gateway:
        cohort = gateway.get("/api/cohorts", headers=_auth()).json()[0]["id"]
        LocalStack(own.home).stop_infra("broker")
        try:
            deadline = time.monotonic() + 10  # the gateway asks the broker at most every 2 s
            while True:
                run = gateway.post(f"/api/cohorts/{cohort}/pipeline", headers=_auth())
                if run.status_code != 202 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert run.status_code == 503, run.text
            assert run.headers["retry-after"] and "broker" in run.json()["detail"]
            # reading needs no broker
            assert gateway.get("/api/cohorts", headers=_auth()).status_code == 200
        finally:
            up = own.cli("up", "-s", "gateway")
            assert up.returncode == 0, up.stderr


def test_cohortflow_run_from_a_clean_shell_uses_the_stored_token_and_grants_its_folder(
    own: OwnStack, dicom_root: Path
) -> None:
    """`cohortflow run FOLDER` with no COHORTFLOW_* exported: it brings the stack up on its stored
    settings, talks to the gateway with the stored token, and may read FOLDER although no root
    covers it; the grant is kept, and what `stack env` then exports is no change."""
    elsewhere = own.root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "not-dicom.txt").write_text("hello")
    # a copy, not a link: a link would lead out of the folder the run grants
    one = next(p for p in sorted((dicom_root / "dcm_qa_ct" / "In").rglob("*")) if p.is_file())
    shutil.copy(one, elsewhere / "one-file")
    before = own.status()["services"]["gateway"]["pid"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    ran = subprocess.run(
        [*COHORTFLOW, "run", str(elsewhere), "--name", "run-folder", "--stages", "extraction",
         "--home", str(own.home), "--json"],
        capture_output=True, text=True, env=clean, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:] + ran.stdout[-3000:]
    result = json.loads(ran.stdout)
    assert result["cohort"]["source_path"] == str(elsewhere)
    assert [(j["stage"], j["status"]) for j in result["jobs"]] == [("extraction", "completed")]
    status = own.status()
    assert status["granted_roots"] == [str(elsewhere)]
    assert status["services"]["gateway"]["pid"] != before  # restarted to see the new root
    exported = own.cli("env").stdout
    roots = next(
        line.split("=", 1)[1] for line in exported.splitlines() if "COHORTFLOW_DATA_ROOTS=" in line
    )
    assert str(elsewhere) in roots
    again = own.cli("up", "-s", "gateway", COHORTFLOW_DATA_ROOTS=roots.strip("'"))
    assert again.returncode == 0, again.stderr
