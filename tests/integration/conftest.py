"""The real stack for integration tests: Postgres, the Tansu broker, the roto S3 server, services.

One `LocalStack` per test session, in a temporary `COHORTFLOW_HOME`, its `COHORTFLOW_*` variables
exported into `os.environ` (so `Settings()` and `get_settings()` see it), stopped at the end.

Which services run as subprocesses:
- by default none (infra only): a test module that drives a service in-process (the gateway API
  tests) must not compete with a subprocess of the same service in its consumer groups;
- a module asks for services with `pytestmark = pytest.mark.stack_services("extractor", ...)`
  (`"all"`: every registered service whose module exists); they run for that module only;
- `COHORTFLOW_TEST_SERVICES=all|none|name,name` starts services for the whole session.
A part that is missing or does not become ready fails the session loudly; nothing is skipped.
Every test here is marked `integration` (`pytest -m "not integration"` is the fast loop).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from cohortflow.services import installed_services
from cohortflow.stack import LocalStack, StackInfo
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore
from tests.conftest import DICOM_ROOT

SERVICES_ENV = "COHORTFLOW_TEST_SERVICES"
# the s3:// sources test cohorts may name (COHORTFLOW_S3_SOURCES)
TEST_S3_SOURCES = ["s3://cohortflow-test-sources", "s3://pacs-export"]


_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder needs the stack: mark it `integration`, so that
    `pytest -m "not integration"` leaves it out without each module saying so."""
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


# the session's stack, once started: a failing test's report says how its parts stood
_SESSION_STACK: list[LocalStack] = []
# per service log: the last lines kept in a failure's report, and how many of them at most
_LOG_TAIL_LINES = 15
_NOTABLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|assigned to partitions|[Rr]ebalanc")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed integration test's report gets a section on the session stack: each part's pid,
    whether it is alive and ready, its restarts, and the tail of each service's log. A run that
    waited on a service that was not there, or one stuck in a consumer group, says so here
    (CI keeps nothing else of the stack)."""
    report = yield
    if report.failed and call.when in ("setup", "call") and _SESSION_STACK:
        try:
            report.sections.append(("session stack", _stack_report(_SESSION_STACK[0])))
        except Exception as exc:  # the report of a failure must not fail itself
            report.sections.append(("session stack", f"not readable: {exc!r}"))
    return report


def _stack_report(local: LocalStack) -> str:
    info = local.status()
    lines = [f"{name}: pid {p.pid} healthy={p.healthy}" for name, p in sorted(info.infra.items())]
    lines += [
        f"{key}: pid {s.pid} healthy={s.healthy} restarts={s.restarts} ({s.last_restart})"
        for key, s in sorted(info.services.items())
    ]
    lines.append(f"supervisor: pid {info.supervisor_pid}")
    for log in sorted(local.home.joinpath("logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        notable = [line for line in text if _NOTABLE.search(line)][-_LOG_TAIL_LINES:]
        tail = text[-_LOG_TAIL_LINES:]
        lines.append(f"--- {log.name}: its last warnings, errors and partition assignments")
        lines += [line[:400] for line in notable]
        lines.append(f"--- {log.name}: its last {len(tail)} lines")
        lines += [line[:400] for line in tail]
    return "\n".join(lines)


def _requested(names: tuple[str, ...] | list[str]) -> list[str]:
    if "all" in names:
        return installed_services()
    return [n for n in names if n not in ("none", "")]


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """The session's LocalStack (infra, plus `COHORTFLOW_TEST_SERVICES`), env exported."""
    # 0755: as root, Postgres runs as an unprivileged user that must reach its folder in here
    home = Path(tempfile.mkdtemp(prefix="cohortflow-stack-"))
    home.chmod(0o755)
    # the shared data is a root too: test cohorts are folders of links to it, and a link that
    # leaves the data roots is rejected, never read
    roots = [Path(tempfile.gettempdir()), Path.home(), DICOM_ROOT.parent]
    local = LocalStack(home / "state", data_roots=roots)
    saved = dict(os.environ)
    # exported before the services start, so they inherit it
    os.environ["COHORTFLOW_S3_SOURCES"] = ",".join(TEST_S3_SOURCES)
    session_services = _requested(os.environ.get(SERVICES_ENV, "none").split(","))
    try:
        info = local.up(services=session_services, infra_only=not session_services)
        if not info.running:
            raise RuntimeError(f"local stack not healthy: {info.summary()}")
        os.environ.update(info.env())
        get_settings.cache_clear()
        _SESSION_STACK.append(local)
        yield local
    finally:
        _SESSION_STACK.clear()
        local.down()
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        if not os.environ.get("COHORTFLOW_TEST_KEEP_HOME"):
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def module_services(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Start the services a module asks for with `stack_services(...)`; stop them after it."""
    marker = request.node.get_closest_marker("stack_services")
    if marker is None:
        yield []
        return
    local: LocalStack = request.getfixturevalue("stack")
    # running ones only: a service recorded but gone (killed by an earlier module, its restart
    # still pending) is started here, or the module would run without it
    already = {key for key, svc in local.status().services.items() if svc.healthy}
    names = _requested(marker.args or ("all",))
    started = []
    try:
        for name in names:
            if name not in already:
                local.start_service(name)
                started.append(name)
        yield names
    finally:
        for name in started:
            local.stop_service(name)


@pytest.fixture(scope="session")
def stack_info(stack: LocalStack) -> StackInfo:
    return stack.status()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_info: StackInfo) -> str:
    return stack_info.kafka_bootstrap


@pytest.fixture(scope="session")
def gateway_url(stack_info: StackInfo) -> str:
    return stack_info.gateway_url


@pytest.fixture(scope="session")
def stack_settings(stack: LocalStack) -> Settings:
    """Settings read from the stack's exported environment."""
    return Settings()


@pytest.fixture(scope="session")
def object_store(stack_settings: Settings) -> ObjectStore:
    """The project's S3 adapter on the stack's S3 server (buckets already exist)."""
    return ObjectStore(stack_settings)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def db_pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()
