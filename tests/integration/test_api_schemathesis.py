"""Schemathesis against a throwaway gateway: every check, every phase (stateful included), 0 failures.

The gateway runs on a local stack of its own (so the runs it starts never reach the session's
services) with a token, so `ignored_auth` is exercised too. Settings are in schemathesis.toml beside
this file; the test adds the one thing it cannot know in advance: folders that exist under the data
roots, offered for `source_path` half of the time so that cohorts really get created and the
stateful phase follows their links.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COHORTFLOW = [sys.executable, "-m", "cohortflow.cli"]
CONFIG = Path(__file__).with_name("schemathesis.toml")
TOKEN = "schemathesis-token"


def _schemathesis() -> str:
    beside = Path(sys.executable).parent / "schemathesis"
    assert beside.exists(), "schemathesis is a test dependency: pip install -e '.[test]'"
    return str(beside)


@pytest.fixture(scope="module")
def throwaway() -> Iterator[tuple[str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="cohortflow-schemathesis-"))
    root.chmod(0o755)  # as root, Postgres runs as another user that must reach its folder
    data = root / "data"
    for name in ("study-a", "study-b"):
        (data / name).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    env |= {"COHORTFLOW_API_TOKEN": TOKEN, "COHORTFLOW_DATA_ROOTS": str(data)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*COHORTFLOW, "stack", *args, "--home", str(root / "state")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip

    try:
        up = cli("up", "-s", "gateway", "--json")
        assert up.returncode == 0, up.stderr + up.stdout
        yield json.loads(up.stdout)["gateway_url"], data
    finally:
        cli("down")
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_schemathesis_finds_nothing(throwaway: tuple[str, Path], tmp_path: Path) -> None:
    url, data = throwaway
    sources = [str(data / "study-a"), str(data / "study-b"), str(data)]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        CONFIG.read_text()
        + f"\n[dictionaries.sources]\nvalues = {json.dumps(sources)}\n"
        + '\n[parameters]\n"body.source_path" = { dictionary = "sources", probability = 0.5 }\n'
    )
    started = time.monotonic()
    done = subprocess.run(
        [_schemathesis(), "--config-file", str(config), "--no-color", "run",
         f"{url}/api/openapi.json", "--checks", "all", "--workers", "1",
         "--header", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    print(f"schemathesis: {cases.group(0) if cases else '?'} in {seconds:.0f} s")
    assert done.returncode == 0, out[-6000:]
    assert cases is not None and cases.group(1) == cases.group(2), out[-3000:]
    assert int(cases.group(1)) > 500  # it really ran
    assert "Stateful" in out and "Scenarios:" in out  # and followed links
