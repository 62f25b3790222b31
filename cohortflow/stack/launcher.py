"""`LocalStack`: Postgres, a Kafka-protocol broker, an S3 server and the services on this machine.

Everything lives under one state dir (`Settings.home`): `stack.json` (ports, urls, pids; 0600 because
it holds the generated secrets), `stack.env` (the `COHORTFLOW_*` variables as `export` lines),
`run/<name>.pid`, `logs/<name>.log`, `postgres/`, `s3/` and `secrets/`. `up` converges: what runs is
left alone, what is missing (or died, leaving a stale pid file) is started again on the same ports.
`down` stops exactly what the state file records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from cohortflow import services as service_registry
from cohortflow.stack import broker, objectstore, processes
from cohortflow.stack.postgres import PostgresCluster, PostgresError
from shared.settings import Settings

T = TypeVar("T")

DB_ROLE = "cohortflow"
DB_NAME = "cohortflow"
# Tansu (like every broker we test against locally) joins a group in about half the session timeout
LOCAL_KAFKA_SESSION_TIMEOUT_MS = 2000
LOCAL_KAFKA_HEARTBEAT_INTERVAL_MS = 400
INFRA = ("postgres", "s3", "broker")


class StackError(RuntimeError):
    """Something of the local stack is missing or did not become ready; the message says what."""


class ProcessInfo(BaseModel):
    """One process of the stack as recorded in `stack.json` (health is measured, not stored)."""

    pid: int | None = None
    program: str = Field(description="substring of its command line, guards against pid reuse")
    port: int
    url: str
    log: str
    healthy: bool = False


class ServiceInfo(ProcessInfo):
    """A service instance: `extractor`, or `extractor-1`, `extractor-2` for extra replicas."""

    service: str
    replica: int = 0


class StackInfo(BaseModel):
    """Where the stack's parts listen, which processes run it, and the environment to reach it."""

    home: Path
    database_url: str
    kafka_bootstrap: str
    s3_endpoint: str
    gateway_url: str
    s3_engine: str
    broker_storage: str
    env_vars: dict[str, str]
    infra: dict[str, ProcessInfo]
    services: dict[str, ServiceInfo] = Field(default_factory=dict)

    @property
    def running(self) -> bool:
        """True when Postgres, the broker and the S3 server all answer."""
        return all(self.infra[name].healthy for name in INFRA if name in self.infra)

    def env(self) -> dict[str, str]:
        """The `COHORTFLOW_*` environment a client, a test or a service needs to use this stack."""
        return dict(self.env_vars)

    def summary(self) -> dict[str, Any]:
        """What `cohortflow stack status --json` prints."""
        return {
            "running": self.running,
            "home": str(self.home),
            "gateway_url": self.gateway_url,
            "database_url": self.database_url,
            "kafka_bootstrap": self.kafka_bootstrap,
            "s3_endpoint": self.s3_endpoint,
            "s3_engine": self.s3_engine,
            "broker_storage": self.broker_storage,
            "infra": {
                name: {"pid": p.pid, "url": p.url, "healthy": p.healthy, "log": p.log}
                for name, p in self.infra.items()
            },
            "services": {
                name: {"pid": s.pid, "url": s.url, "healthy": s.healthy, "log": s.log}
                for name, s in self.services.items()
            },
        }


class LocalStack:
    """Start, inspect and stop the local stack whose state lives in `home`."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        registry: Mapping[str, str] = service_registry.SERVICES,
        data_roots: Iterable[Path] | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.settings = Settings()
        self.home = Path(home or self.settings.home).expanduser().resolve()
        self.registry = dict(registry)
        self.data_roots = (
            list(data_roots)
            if data_roots is not None
            else (self.settings.data_roots or [Path.home(), Path("/")])
        )
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._handles: dict[str, subprocess.Popen[bytes]] = {}

    # ---- paths -------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.home / "stack.env"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    # ---- public API ---------------------------------------------------------------------------
    def up(self, services: Iterable[str] | None = None, infra_only: bool = False) -> StackInfo:
        """Start what is not running: infra, then `services` (default: every installed service).

        Raises `StackError` (with the tail of its log) when a part does not become ready.
        """
        with self._locked():
            self.home.mkdir(parents=True, exist_ok=True)
            info = self._load() or self._new_info()
            try:
                self._ensure_s3(info)
                self._ensure_broker(info)
                self._ensure_postgres(info)
                if not infra_only:
                    names = (
                        list(services)
                        if services is not None
                        else service_registry.installed_services(self.registry)
                    )
                    for name in names:
                        current = info.services.get(name)
                        if current is None or not processes.pid_alive(current.pid, current.program):
                            self._start_service(info, name, 0)
            finally:
                self._save(info)
        return self.status()

    def down(self) -> StackInfo | None:
        """Stop every recorded process (services first, Postgres last); None if never started."""
        with self._locked():
            info = self._load()
            if info is None:
                return None
            for key in list(info.services):
                self._stop_process(key, info.services[key])
            info.services.clear()
            for name in ("broker", "s3"):
                self._stop_process(name, info.infra[name])
            cluster = self._cluster(info.infra["postgres"].port)
            try:
                cluster.stop()
            except PostgresError:
                pid = cluster.pid
                if pid:
                    processes.stop(pid, "postgres", self.stop_timeout)
            info.infra["postgres"].pid = None
            self._save(info)
        return self.status()

    def status(self) -> StackInfo:
        """The recorded stack with health measured now; raises `StackError` if never started."""
        info = self._load()
        if info is None:
            raise StackError(f"no local stack in {self.home}: run `cohortflow stack up`")
        # the postmaster is started by pg_ctl: its pid file is the truth, not ours
        info.infra["postgres"].pid = self._cluster_pid()
        for proc in info.infra.values():
            alive = processes.pid_alive(proc.pid, proc.program)
            if not alive:
                proc.pid = None
            proc.healthy = alive and processes.port_open(proc.port)
        for svc in info.services.values():
            alive = processes.pid_alive(svc.pid, svc.program)
            svc.healthy = alive and processes.http_ready(f"{svc.url}/readyz")
        return info

    def restart_broker(self, sig: int = signal.SIGTERM) -> StackInfo:
        """Stop the broker (`sig`, SIGKILL after the stop timeout) and start it on the same port."""
        with self._locked():
            info = self._require()
            proc = info.infra["broker"]
            if processes.pid_alive(proc.pid, proc.program) and proc.pid:
                if sig == signal.SIGTERM:
                    self._stop_process("broker", proc)
                else:
                    processes.signal_group(proc.pid, sig)
                    self._wait_gone("broker", proc)
            self._ensure_broker(info)
            self._save(info)
        return self.status()

    def start_service(self, name: str, replica: int = 0) -> ServiceInfo:
        """Start one instance of a registered service and wait for its `/readyz`."""
        with self._locked():
            info = self._require()
            key = name if replica == 0 else f"{name}-{replica}"
            current = info.services.get(key)
            if current is not None and processes.pid_alive(current.pid, current.program):
                return current
            try:
                return self._start_service(info, name, replica)
            finally:
                self._save(info)

    def kill_service(self, key: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a service instance's process group (a crash when SIGKILL)."""
        info = self._require()
        svc = info.services.get(key)
        if svc is None or not processes.pid_alive(svc.pid, svc.program) or svc.pid is None:
            raise StackError(f"service instance {key!r} is not running")
        processes.signal_group(svc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._wait_gone(key, svc)

    def stop_service(self, key: str) -> None:
        """Stop a service instance gracefully (SIGTERM, then SIGKILL after the stop timeout)."""
        with self._locked():
            info = self._require()
            svc = info.services.pop(key, None)
            if svc is not None:
                self._stop_process(key, svc)
            self._save(info)

    # ---- infra --------------------------------------------------------------------------------
    def _new_info(self) -> StackInfo:
        ports = {name: processes.free_port() for name in (*INFRA, "gateway")}
        s3_endpoint = f"127.0.0.1:{ports['s3']}"
        db_password = self._secret("db_password")
        env = {
            "COHORTFLOW_HOME": str(self.home),
            "COHORTFLOW_DATABASE_URL": (
                f"postgresql://{DB_ROLE}:{db_password}@127.0.0.1:{ports['postgres']}/{DB_NAME}"
            ),
            "COHORTFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['broker']}",
            "COHORTFLOW_KAFKA_PARTITIONS": str(self.settings.kafka_partitions),
            "COHORTFLOW_KAFKA_SESSION_TIMEOUT_MS": str(LOCAL_KAFKA_SESSION_TIMEOUT_MS),
            "COHORTFLOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(LOCAL_KAFKA_HEARTBEAT_INTERVAL_MS),
            "COHORTFLOW_S3_ENDPOINT": s3_endpoint,
            "COHORTFLOW_S3_ACCESS_KEY": self.settings.s3_access_key,
            "COHORTFLOW_S3_SECRET_KEY": self.settings.s3_secret_key.get_secret_value(),
            "COHORTFLOW_S3_SECURE": "false",
            "COHORTFLOW_S3_REGION": self.settings.s3_region,
            "COHORTFLOW_DATA_BUCKET": self.settings.data_bucket,
            "COHORTFLOW_AUDIT_BUCKET": self.settings.audit_bucket,
            "COHORTFLOW_GATEWAY_HOST": "127.0.0.1",
            "COHORTFLOW_GATEWAY_PORT": str(ports["gateway"]),
            "COHORTFLOW_PROJECT_SECRET": self._secret("project_secret"),
            "COHORTFLOW_DATA_ROOTS": os.pathsep.join(str(p) for p in self.data_roots),
        }
        server = objectstore.s3_server(ports["s3"], self.home / "s3")
        return StackInfo(
            home=self.home,
            database_url=env["COHORTFLOW_DATABASE_URL"],
            kafka_bootstrap=env["COHORTFLOW_KAFKA_BOOTSTRAP"],
            s3_endpoint=s3_endpoint,
            gateway_url=f"http://127.0.0.1:{ports['gateway']}",
            s3_engine=server.engine,
            broker_storage=f"tansu s3://{broker.BROKER_BUCKET}/ on {server.engine}",
            env_vars=env,
            infra={
                "postgres": ProcessInfo(
                    program="postgres",
                    port=ports["postgres"],
                    url=f"postgresql://127.0.0.1:{ports['postgres']}",
                    log=str(self.log_file("postgres")),
                ),
                "s3": ProcessInfo(
                    program=Path(server.argv[0]).name,
                    port=ports["s3"],
                    url=f"http://{s3_endpoint}",
                    log=str(self.log_file("s3")),
                ),
                "broker": ProcessInfo(
                    program="tansu",
                    port=ports["broker"],
                    url=f"tcp://127.0.0.1:{ports['broker']}",
                    log=str(self.log_file("broker")),
                ),
            },
        )

    def _ensure_s3(self, info: StackInfo) -> None:
        proc = info.infra["s3"]
        if not (processes.pid_alive(proc.pid, proc.program) and processes.port_open(proc.port)):
            self._reclaim_port("s3", proc)
            server = objectstore.s3_server(proc.port, self.home / "s3")
            self._spawn_and_wait_port("s3", proc, server.argv, dict(os.environ))
        env = info.env_vars
        client = objectstore.s3_client(
            info.s3_endpoint,
            env["COHORTFLOW_S3_ACCESS_KEY"],
            env["COHORTFLOW_S3_SECRET_KEY"],
            env["COHORTFLOW_S3_REGION"],
        )
        buckets = [
            env["COHORTFLOW_DATA_BUCKET"],
            env["COHORTFLOW_AUDIT_BUCKET"],
            broker.BROKER_BUCKET,
        ]
        objectstore.ensure_buckets(client, buckets)

    def _ensure_broker(self, info: StackInfo) -> None:
        proc = info.infra["broker"]
        if not (processes.pid_alive(proc.pid, proc.program) and processes.port_open(proc.port)):
            self._reclaim_port("broker", proc)
            env = info.env_vars
            broker_env = os.environ | broker.broker_env(
                info.s3_endpoint,
                env["COHORTFLOW_S3_ACCESS_KEY"],
                env["COHORTFLOW_S3_SECRET_KEY"],
                env["COHORTFLOW_S3_REGION"],
            )
            self._spawn_and_wait_port("broker", proc, broker.broker_command(proc.port), broker_env)
        topic_settings = Settings(
            kafka_bootstrap=info.kafka_bootstrap,
            kafka_partitions=int(info.env_vars["COHORTFLOW_KAFKA_PARTITIONS"]),
            kafka_replication_factor=1,  # one local broker
        )
        _blocking(broker.ensure_topics(topic_settings))

    def _ensure_postgres(self, info: StackInfo) -> None:
        proc = info.infra["postgres"]
        cluster = self._cluster(proc.port)
        if cluster.pid is None:
            if not cluster.initialised():
                cluster.init(self._secret("pg_superuser_password"))
            self._reclaim_port("postgres", proc)
            cluster.port = proc.port
            try:
                cluster.start()
            except PostgresError as exc:
                raise StackError(
                    f"Postgres did not start: {exc}\n{processes.log_tail(cluster.log_file)}"
                ) from exc
        proc.pid = cluster.pid
        self._link_log("postgres", cluster.log_file)
        _blocking(cluster.ensure_database(DB_ROLE, self._secret("db_password"), DB_NAME))

    def _cluster(self, port: int) -> PostgresCluster:
        return PostgresCluster.for_home(self.home, port)

    def _cluster_pid(self) -> int | None:
        data = self.home / "postgres" / "data" / "postmaster.pid"
        pid = processes.read_pid(data)
        return pid if processes.pid_alive(pid, "postgres") else None

    # ---- services -----------------------------------------------------------------------------
    def _start_service(self, info: StackInfo, name: str, replica: int) -> ServiceInfo:
        if name not in self.registry:
            raise StackError(f"unknown service {name!r}; registered: {', '.join(self.registry)}")
        key = name if replica == 0 else f"{name}-{replica}"
        previous = info.services.get(key)
        if name == "gateway" and replica == 0:
            port = int(info.env_vars["COHORTFLOW_GATEWAY_PORT"])
        else:
            port = processes.free_port(previous.port if previous else None)
        env = os.environ | info.env_vars
        env |= {
            "COHORTFLOW_SERVICE_PORT": str(port),
            "COHORTFLOW_SERVICE_HOST": "127.0.0.1",
            "COHORTFLOW_INSTANCE": key,
        }
        if name == "gateway":
            env["COHORTFLOW_GATEWAY_PORT"] = str(port)
        svc = ServiceInfo(
            service=name,
            replica=replica,
            program="cohortflow",
            port=port,
            url=f"http://127.0.0.1:{port}",
            log=str(self.log_file(key)),
        )
        info.services[key] = svc
        handle = processes.spawn(
            [*cohortflow_command(), name], Path(svc.log), env, self.pid_file(key)
        )
        self._handles[key] = handle
        svc.pid = handle.pid
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = handle.poll()
            if code is not None:
                info.services.pop(key, None)
                self.pid_file(key).unlink(missing_ok=True)
                raise StackError(
                    f"service {key} exited with code {code} before it was ready; "
                    f"last lines of {svc.log}:\n{processes.log_tail(Path(svc.log))}"
                )
            if processes.http_ready(f"{svc.url}/readyz"):
                svc.healthy = True
                return svc
            time.sleep(0.2)
        self._stop_process(key, svc)
        info.services.pop(key, None)
        raise StackError(
            f"service {key} did not answer {svc.url}/readyz within {self.ready_timeout:.0f}s; "
            f"last lines of {svc.log}:\n{processes.log_tail(Path(svc.log))}"
        )

    # ---- processes ----------------------------------------------------------------------------
    def _spawn_and_wait_port(
        self, name: str, proc: ProcessInfo, argv: list[str], env: Mapping[str, str]
    ) -> None:
        handle = processes.spawn(argv, Path(proc.log), env, self.pid_file(name))
        self._handles[name] = handle
        proc.pid = handle.pid
        deadline = time.monotonic() + self.ready_timeout
        while not processes.port_open(proc.port):
            code = handle.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with code {code}" if code is not None else "timed out"
                if code is None:
                    processes.stop(handle.pid, proc.program, self.stop_timeout, handle)
                proc.pid = None
                raise StackError(
                    f"{name} ({' '.join(argv)}) {why} before listening on 127.0.0.1:{proc.port}; "
                    f"last lines of {proc.log}:\n{processes.log_tail(Path(proc.log))}"
                )
            time.sleep(0.05)

    def _stop_process(self, name: str, proc: ProcessInfo) -> None:
        if proc.pid is not None:
            processes.stop(proc.pid, proc.program, self.stop_timeout, self._handles.get(name))
        self._reap(name)
        proc.pid = None
        proc.healthy = False
        self.pid_file(name).unlink(missing_ok=True)

    def _wait_gone(self, name: str, proc: ProcessInfo) -> None:
        deadline = time.monotonic() + self.stop_timeout
        while processes.pid_alive(proc.pid, proc.program) and time.monotonic() < deadline:
            self._reap(name, wait=False)
            time.sleep(0.05)
        self._reap(name)

    def _reap(self, name: str, wait: bool = True) -> None:
        handle = self._handles.get(name)
        if handle is None:
            return
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.wait(self.stop_timeout)
        if handle.poll() is not None:
            self._handles.pop(name, None)

    def _reclaim_port(self, name: str, proc: ProcessInfo) -> None:
        """Keep the recorded port when it is free again; a stale pid file is dropped."""
        self.pid_file(name).unlink(missing_ok=True)
        if processes.port_open(proc.port):
            raise StackError(
                f"{name}: port {proc.port} recorded in {self.state_file} is taken by another "
                f"program; stop it or remove {self.state_file}"
            )

    def _link_log(self, name: str, target: Path) -> None:
        link = self.log_file(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.resolve() != target.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(target)

    # ---- state --------------------------------------------------------------------------------
    def _secret(self, name: str) -> str:
        """A random secret generated once and kept in `<home>/secrets/<name>` (0600)."""
        folder = self.home / "secrets"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _load(self) -> StackInfo | None:
        try:
            return StackInfo.model_validate_json(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def _require(self) -> StackInfo:
        info = self._load()
        if info is None:
            raise StackError(f"no local stack in {self.home}: run `cohortflow stack up` first")
        return info

    def _save(self, info: StackInfo) -> None:
        _write_private(self.state_file, info.model_dump_json(indent=2))
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(info.env_vars.items())]
        _write_private(self.env_file, "\n".join(lines) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up`/`down` at a time per state dir (across processes)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with (self.home / "stack.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def cohortflow_command() -> list[str]:
    """How to run `cohortflow`: the console script beside this interpreter, else `-m`."""
    script = Path(sys.executable).parent / "cohortflow"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cohortflow.cli"]


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when an event loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
