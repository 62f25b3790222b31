"""The local stack itself: each part answers, the broker keeps data across restarts, the launcher
starts, kills, restarts and stops exactly what it should, and `cohortflow stack` reports it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from cohortflow.services import SERVICES
from cohortflow.stack import LocalStack, StackError
from cohortflow.stack.processes import MEMBER_ENV, pid_alive
from cohortflow.stack.processes import members as stack_members
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.topics import all_topics

pytestmark = pytest.mark.integration

COHORTFLOW = [sys.executable, "-m", "cohortflow.cli"]


# ---- each part answers ------------------------------------------------------------------------
async def test_postgres_answers_as_the_owner_of_its_database(db_pool: asyncpg.Pool) -> None:
    row = await db_pool.fetchrow(
        "SELECT current_user AS who, current_database() AS db, current_setting('server_version_num')::int AS v"
    )
    assert (row["who"], row["db"]) == ("cohortflow", "cohortflow")
    assert row["v"] >= 150000
    schema = f"t_{uuid.uuid4().hex[:8]}"
    async with db_pool.acquire() as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE {schema}.series (uid text PRIMARY KEY, n int)")
        await conn.executemany(
            f"INSERT INTO {schema}.series VALUES ($1, $2)", [("1.2.3", 10), ("1.2.4", 20)]
        )
        assert await conn.fetchval(f"SELECT sum(n) FROM {schema}.series") == 30
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_tcp_logins_need_the_generated_password(stack_settings: Settings) -> None:
    url = stack_settings.database_url
    wrong = url.replace(url.split("@")[0].split(":")[-1], "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


async def test_every_topic_exists_with_the_configured_partitions(
    kafka_bootstrap: str, stack_settings: Settings
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(all_topics())
    finally:
        await admin.close()
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == {t: stack_settings.kafka_partitions for t in all_topics()}


def test_object_put_is_read_back(object_store: ObjectStore) -> None:
    key = f"raw/stack-test/{uuid.uuid4().hex}/file.dcm"
    payload = os.urandom(20 * 1024 * 1024 + 17)  # above the adapter's 16 MiB part size
    digest = object_store.put_bytes(key, payload)
    assert object_store.get_bytes(key) == payload
    assert object_store.get_range(key, 128, 4) == payload[128:132]
    info = object_store.stat(key)
    assert info is not None and (info.size, info.sha256) == (len(payload), digest)
    assert [o.key for o in object_store.list(key.rsplit("/", 1)[0])] == [key]
    url = object_store.presigned_get(key, timedelta(minutes=5))
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).content == payload[:10]
    object_store.delete(key)
    assert not object_store.exists(key)


# ---- the broker -------------------------------------------------------------------------------
async def _topic(bootstrap: str, partitions: int = 3) -> str:
    name = f"stack-test.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def _produce(bootstrap: str, topic: str, values: range) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in values:
            await producer.send_and_wait(
                topic, key=f"study-{i % 7}".encode(), value=str(i).encode()
            )
    finally:
        await producer.stop()


async def _consume(
    bootstrap: str, topic: str, group: str, limit: int, settings: Settings
) -> list[int]:
    """Read up to `limit` records in `group`, committing after each batch (never auto-commit)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    await consumer.start()
    got: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < limit and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=limit - len(got))
            for records in batch.values():
                got += [int(r.value) for r in records if r.value is not None]
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def test_a_group_resumes_after_its_manual_commit(
    kafka_bootstrap: str, stack_settings: Settings
) -> None:
    topic = await _topic(kafka_bootstrap)
    await _produce(kafka_bootstrap, topic, range(40))
    first = await _consume(kafka_bootstrap, topic, "g-resume", 15, stack_settings)
    rest = await _consume(kafka_bootstrap, topic, "g-resume", 25, stack_settings)
    assert len(first) == 15 and not set(first) & set(rest)
    assert sorted(first + rest) == list(range(40))


async def test_a_killed_broker_loses_neither_messages_nor_offsets(
    stack: LocalStack, kafka_bootstrap: str, stack_settings: Settings
) -> None:
    topic = await _topic(kafka_bootstrap)
    await _produce(kafka_bootstrap, topic, range(300))
    first = await _consume(kafka_bootstrap, topic, "g-restart", 120, stack_settings)
    old_pid = stack.status().infra["broker"].pid

    info = stack.restart_broker(signal.SIGKILL)  # a crash, not a clean shutdown

    assert info.infra["broker"].healthy and info.infra["broker"].pid != old_pid
    assert info.kafka_bootstrap == kafka_bootstrap
    rest = await _consume(kafka_bootstrap, topic, "g-restart", 180, stack_settings)
    assert len(first) == 120 and not set(first) & set(rest)
    assert sorted(first + rest) == list(range(300))
    # and producing still works after the restart
    await _produce(kafka_bootstrap, topic, range(300, 310))
    assert sorted(await _consume(kafka_bootstrap, topic, "g-restart", 10, stack_settings)) == list(
        range(300, 310)
    )


# ---- the launcher -----------------------------------------------------------------------------
def test_status_reports_every_part_and_the_env_it_exported(stack: LocalStack) -> None:
    info = stack.status()
    assert info.running
    assert {name: p.healthy for name, p in info.infra.items()} == {
        "postgres": True,
        "s3": True,
        "broker": True,
    }
    env = info.env()
    assert env["COHORTFLOW_KAFKA_SESSION_TIMEOUT_MS"] == "2000"
    assert env["COHORTFLOW_KAFKA_HEARTBEAT_INTERVAL_MS"] == "400"
    assert (
        env["COHORTFLOW_DATABASE_URL"] == info.database_url == os.environ["COHORTFLOW_DATABASE_URL"]
    )
    assert len(env["COHORTFLOW_PROJECT_SECRET"]) == 64
    for private in (stack.state_file, stack.env_file, stack.home / "secrets" / "project_secret"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for name in ("s3", "broker"):
        assert int(stack.pid_file(name).read_text()) == info.infra[name].pid
    assert f"export COHORTFLOW_S3_ENDPOINT={info.s3_endpoint}" in stack.env_file.read_text()


def test_up_again_starts_nothing(stack: LocalStack) -> None:
    before = stack.status()
    after = stack.up(infra_only=True)
    assert {n: p.pid for n, p in after.infra.items()} == {n: p.pid for n, p in before.infra.items()}


def test_a_service_that_dies_before_ready_fails_loudly_with_its_log(stack: LocalStack) -> None:
    broken = LocalStack(stack.home, registry={"no-such-service": "services.nowhere.app:main"})
    with pytest.raises(StackError) as failure:
        broken.start_service("no-such-service")
    message = str(failure.value)
    assert "no-such-service exited with code 2 before it was ready" in message
    assert "No such command" in message  # the tail of its log
    assert "no-such-service" not in stack.status().services


def test_a_killed_service_comes_back_and_runs_two_replicas(stack: LocalStack) -> None:
    first = stack.start_service("extractor")
    assert first.healthy and pid_alive(first.pid)
    stack.kill_service("extractor", signal.SIGKILL)
    assert not stack.status().services["extractor"].healthy
    again = stack.start_service("extractor")
    second = stack.start_service("extractor", replica=1)
    try:
        services = stack.status().services
        assert again.pid != first.pid and services["extractor"].healthy
        assert services["extractor-1"].healthy and second.port != again.port
        ready = httpx.get(f"{second.url}/readyz", timeout=2)
        assert ready.status_code == 200
    finally:
        stack.stop_service("extractor-1")
        stack.stop_service("extractor")
    assert not pid_alive(again.pid) and not pid_alive(second.pid)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    return subprocess.run(
        [*COHORTFLOW, "stack", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_cli_up_status_down_on_a_second_stack() -> None:
    """A stack of its own: up, status --json, kill a part, up repairs it, down stops everything."""
    root = Path(tempfile.mkdtemp(prefix="cohortflow-cli-"))
    root.chmod(0o755)
    home = root / "state"
    try:
        up = _cli(home, "up", "--infra-only", "--json")
        assert up.returncode == 0, up.stderr + up.stdout
        status = json.loads(_cli(home, "status", "--json").stdout)
        assert status["running"] is True and status["services"] == {}
        for key in ("gateway_url", "database_url", "kafka_bootstrap", "s3_endpoint"):
            assert status[key] == json.loads(up.stdout)[key]
        pids = {name: part["pid"] for name, part in status["infra"].items()}

        os.kill(pids["broker"], signal.SIGKILL)  # leaves a stale pid file behind
        deadline = time.monotonic() + 5
        while pid_alive(pids["broker"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        stale = _cli(home, "status", "--json")
        assert (
            stale.returncode == 1
            and json.loads(stale.stdout)["infra"]["broker"]["healthy"] is False
        )
        repaired = json.loads(_cli(home, "up", "--infra-only", "--json").stdout)
        assert repaired["infra"]["broker"]["healthy"] is True
        assert repaired["infra"]["postgres"]["pid"] == pids["postgres"]  # untouched
        assert repaired["kafka_bootstrap"] == status["kafka_bootstrap"]  # same port again

        env = _cli(home, "env")
        assert f"export COHORTFLOW_KAFKA_BOOTSTRAP={status['kafka_bootstrap']}" in env.stdout

        down = _cli(home, "down", "--json")
        assert down.returncode == 0, down.stderr
        running = [p["pid"] for p in repaired["infra"].values()]
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(pid) for pid in running)
        after = _cli(home, "status", "--json")
        assert after.returncode == 1 and json.loads(after.stdout)["running"] is False
        assert not list((home / "run").glob("*.pid"))
    finally:
        _cli(home, "down")
        subprocess.run(["rm", "-rf", str(root)], check=False)


async def test_the_launcher_works_from_inside_an_event_loop(stack: LocalStack) -> None:
    # fault tests call the launcher from async tests: its own asyncio calls must not collide
    assert stack.up(infra_only=True).running
    assert (await asyncio.to_thread(stack.status)).running


def test_every_registered_service_has_a_cli_command() -> None:
    helped = subprocess.run([*COHORTFLOW, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for name in SERVICES:
        assert name in helped.stdout


# ---- supervision --------------------------------------------------------------------------------
def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> float:
    """Seconds until `check()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"waited {timeout:.0f}s for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_the_supervisor_restarts_a_killed_service_with_backoff(stack: LocalStack) -> None:
    first = stack.start_service("sorter")
    supervisor = stack.status().supervisor_pid
    assert supervisor is not None and pid_alive(supervisor)
    log = Path(stack.status().supervisor_log)
    assert first.pid
    try:
        os.kill(first.pid, signal.SIGKILL)  # the service alone, as the OOM killer would

        def restarted(count: int) -> Callable[[], bool]:
            def check() -> bool:  # ready, and the supervisor has seen it ready
                svc = stack.status().services["sorter"]
                done = log.read_text().count("sorter restarted as pid")
                return svc.healthy and svc.restarts == count and done == count

            return check

        took = _wait_for("the first restart", restarted(1))
        svc = stack.status().services["sorter"]
        assert svc.pid != first.pid and svc.port == first.port  # same port again
        assert svc.last_restart and "sorter (pid" in svc.last_restart
        print(f"SIGKILL -> sorter ready again: {took:.1f}s")

        assert svc.pid
        os.kill(svc.pid, signal.SIGKILL)  # dies again at once: the delay doubles
        took = _wait_for("the second restart", restarted(2))
        print(f"second SIGKILL -> sorter ready again: {took:.1f}s")
        text = log.read_text()
        assert "restart in 1.0 s (death 1 in a row)" in text
        assert "restart in 2.0 s (death 2 in a row)" in text
        assert text.count("sorter restarted as pid") == 2
        summary = stack.status().summary()
        assert summary["services"]["sorter"]["restarts"] == 2
        assert summary["supervisor"]["pid"] == supervisor
    finally:
        stack.stop_service("sorter")
    time.sleep(2.5)  # longer than the next backoff: a service stopped on purpose stays stopped
    assert "sorter" not in stack.status().services
    assert log.read_text().count("sorter restarted as pid") == 2


def test_down_stops_the_supervisor_the_services_and_their_orphans() -> None:
    """A stack of its own with one service; an orphan marked as the stack's (a conversion whose
    service died) is stopped by `down` too, and nothing of the stack runs afterwards."""
    root = Path(tempfile.mkdtemp(prefix="cohortflow-down-"))
    root.chmod(0o755)
    home = root / "state"
    try:
        up = _cli(home, "up", "-s", "sorter", "--json")
        assert up.returncode == 0, up.stderr + up.stdout
        status = json.loads(_cli(home, "status", "--json").stdout)
        supervisor = status["supervisor"]["pid"]
        assert supervisor and pid_alive(supervisor)
        assert status["services"]["sorter"]["restarts"] == 0
        table = _cli(home, "status")
        assert "restarts" in table.stdout and "supervisor: pid" in table.stdout
        orphan = subprocess.Popen(
            ["sleep", "600"],
            env={**os.environ, MEMBER_ENV: str(home.resolve())},
            start_new_session=True,
        )
        # until the child has exec'd, /proc shows the parent's environment (without the mark)
        deadline = time.monotonic() + 10
        while orphan.pid not in (members := stack_members(home.resolve())):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert orphan.pid in members and supervisor in members
        assert status["services"]["sorter"]["pid"] in members

        down = _cli(home, "down", "--json")
        assert down.returncode == 0, down.stderr
        orphan.wait(timeout=15)  # stopped (and reaped here, its parent)
        assert stack_members(home.resolve()) == []
        assert not pid_alive(supervisor)
        after = json.loads(_cli(home, "status", "--json").stdout)
        assert after["supervisor"]["pid"] is None and after["services"] == {}
    finally:
        _cli(home, "down")
        subprocess.run(["rm", "-rf", str(root)], check=False)
