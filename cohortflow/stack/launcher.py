"""`LocalStack`: Postgres, a Kafka-protocol broker, an S3 server and the services on this machine.

Everything lives under one state dir (`Settings.home`): `settings.json` (the settings chosen when the
stack was created, reused on every restart: `cohortflow/stack/settings.py`, ADR 0018), `stack.json`
(ports, urls, pids; 0600 because it holds the generated secrets), `stack.env` (the `COHORTFLOW_*`
variables as `export` lines),
`run/<name>.pid`, `logs/<name>.log`, `postgres/`, `s3/` and `secrets/`. `up` converges: what runs is
left alone, what is missing (or died, leaving a stale pid file) is started again on the same ports.
While services run, a supervisor (`cohortflow/stack/supervisor.py`, ADR 0019) restarts one that dies.
`down` stops the supervisor, what the state file records, then every process still marked as the
stack's (`processes.MEMBER_ENV`): orphaned worker pools and conversions included.
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
from cohortflow.stack import settings as stack_settings
from cohortflow.stack.postgres import PostgresCluster, PostgresError
from cohortflow.stack.settings import Difference, SettingsError, StackSettings
from shared.settings import Settings

T = TypeVar("T")

DB_ROLE = "cohortflow"
DB_NAME = "cohortflow"
# Tansu (like every broker we test against locally) joins a group in about half the session timeout
LOCAL_KAFKA_SESSION_TIMEOUT_MS = 2000
LOCAL_KAFKA_HEARTBEAT_INTERVAL_MS = 400
INFRA = ("postgres", "s3", "broker")
SUPERVISOR_MODULE = "cohortflow.stack.supervisor"


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
    # how often the supervisor restarted it, and why it last did
    restarts: int = 0
    last_restart: str | None = None


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
    # filled in by `status()` from settings.json, not stored here: every setting, secrets masked
    settings: dict[str, str] = Field(default_factory=dict, exclude=True)
    granted_roots: list[str] = Field(default_factory=list, exclude=True)
    supervisor_pid: int | None = Field(default=None, exclude=True)
    supervisor_log: str = Field(default="", exclude=True)

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
            "settings": self.settings,
            "granted_roots": self.granted_roots,
            "infra": {
                name: {"pid": p.pid, "url": p.url, "healthy": p.healthy, "log": p.log}
                for name, p in self.infra.items()
            },
            "supervisor": {"pid": self.supervisor_pid, "log": self.supervisor_log},
            "services": {
                name: {
                    "pid": s.pid,
                    "url": s.url,
                    "healthy": s.healthy,
                    "log": s.log,
                    "restarts": s.restarts,
                    "last_restart": s.last_restart,
                }
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
        # asked for explicitly (like COHORTFLOW_DATA_ROOTS, which it overrides); None: not asked
        self.data_roots = list(data_roots) if data_roots is not None else None
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

    @property
    def settings_file(self) -> Path:
        return self.home / "settings.json"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    # ---- public API ---------------------------------------------------------------------------
    def up(
        self,
        services: Iterable[str] | None = None,
        infra_only: bool = False,
        *,
        reconfigure: bool = False,
        allow: Iterable[Path] = (),
        probe: bool = True,
    ) -> StackInfo:
        """Start what is not running: infra, then `services` (default: every installed service).

        The stack runs on the settings stored when it was created. A setting the environment (or
        the constructor's `data_roots`) asks to change raises `StackError` naming it, unless
        `reconfigure`: then it is stored and the running services are restarted with it. `allow`:
        folders a run names, added to the data roots when no root covers them (services restart).
        Raises `StackError` (with the tail of its log) when a part does not become ready.
        `probe=False`: the returned info's `healthy` flags are not measured (each service's
        /readyz, ~0.1-0.4 s), for a caller that needs only the addresses (`cohortflow run`).
        """
        with self._locked():
            self.home.mkdir(parents=True, exist_ok=True)
            previous = self._load()
            stored = self._settings(previous, reconfigure, allow)
            info = previous or self._new_info(stored)
            changed = self._sync_env(info, stored)
            before = self._running_pids(info)
            try:
                # find Postgres' binaries before starting anything, so a machine without them
                # gets the message, not a half-started stack
                self._cluster(info.infra["postgres"].port)
                self._ensure_s3(info)
                self._ensure_broker(info)
                self._ensure_postgres(info)
                if changed:
                    self._restart_services(info)
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
            except BaseException as exc:
                self._stop_started(info, before)
                if isinstance(exc, PostgresError):
                    raise StackError(f"the stack's Postgres cannot start: {exc}") from exc
                raise
            finally:
                self._save(info)
                if info.services:
                    self._ensure_supervisor(info)
        return self.status(probe=probe)

    def _running_pids(self, info: StackInfo) -> dict[str, int]:
        """The pid of each part that runs now (before an `up` starts anything)."""
        running = {"postgres": self._cluster_pid()}
        for name, proc in [*info.infra.items(), *info.services.items()]:
            if name != "postgres" and processes.pid_alive(proc.pid, proc.program):
                running[name] = proc.pid
        return {name: pid for name, pid in running.items() if pid is not None}

    def _stop_started(self, info: StackInfo, before: Mapping[str, int]) -> None:
        """After a failed `up`: stop what it started, leave what ran before it (errors ignored:
        the failure that got us here is the one to report)."""
        for key, svc in list(info.services.items()):
            if svc.pid is not None and svc.pid != before.get(key):
                with contextlib.suppress(Exception):
                    self._stop_process(key, svc)
                info.services.pop(key, None)
        for name in ("broker", "s3", "postgres"):
            pid = self._cluster_pid() if name == "postgres" else info.infra[name].pid
            if pid is not None and pid != before.get(name):
                with contextlib.suppress(Exception):
                    self._stop_infra(info, name)

    def down(self) -> StackInfo | None:
        """Stop every recorded process (services first, Postgres last); None if never started."""
        with self._locked():
            info = self._load()
            if info is None:
                return None
            self._stop_supervisor()  # first: it would restart what is stopped next
            for key in list(info.services):
                self._stop_process(key, info.services[key])
            info.services.clear()
            for name in ("broker", "s3", "postgres"):
                self._stop_infra(info, name)
            self._save(info)
            orphans = processes.stop_members(self.home, self.stop_timeout)
            if orphans:
                log_line(self.log_file("supervisor"), f"down: stopped stray processes {orphans}")
        return self.status()

    def stop_infra(self, name: str) -> StackInfo:
        """Stop one of Postgres, the broker, the S3 server (an outage); `up` starts it again."""
        if name not in INFRA:
            raise StackError(f"unknown part {name!r}; the stack's parts are {', '.join(INFRA)}")
        with self._locked():
            info = self._require()
            self._stop_infra(info, name)
            self._save(info)
        return self.status()

    def status(self, probe: bool = True) -> StackInfo:
        """The recorded stack with health measured now (`probe=False`: the services' health is not
        asked, their `healthy` stays false); raises `StackError` if never started."""
        info = self._load()
        if info is None:
            raise StackError(f"no local stack in {self.home}: run `cohortflow stack up`")
        stored = self._load_settings()
        if stored is not None:
            info.settings = stored.shown()
            info.granted_roots = list(stored.granted_roots)
        # the postmaster is started by pg_ctl: its pid file is the truth, not ours
        info.infra["postgres"].pid = self._cluster_pid()
        for proc in info.infra.values():
            alive = processes.pid_alive(proc.pid, proc.program)
            if not alive:
                proc.pid = None
            proc.healthy = alive and processes.port_open(proc.port)

        def healthy(svc: ServiceInfo) -> bool:
            alive = processes.pid_alive(svc.pid, svc.program)
            return alive and processes.http_ready(f"{svc.url}/readyz")

        # each /readyz asks its service's database and broker (~0.1 s): all at once
        services = list(info.services.values()) if probe else []
        with ThreadPoolExecutor(max_workers=max(1, len(services))) as probes:
            for svc, ok in zip(services, probes.map(healthy, services), strict=True):
                svc.healthy = ok
        info.supervisor_pid = self._supervisor_pid()
        info.supervisor_log = str(self.log_file("supervisor"))
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
                self._ensure_supervisor(info)

    def recorded(self) -> StackInfo | None:
        """The state file as it is (no health measured); None if the stack was never started."""
        return self._load()

    def handle(self, key: str) -> subprocess.Popen[bytes] | None:
        """The process handle of a part this object started (its exit status), if any."""
        return self._handles.get(key)

    def restart_service(self, key: str, why: str) -> ServiceInfo | None:
        """Start a recorded service instance that died again (the supervisor's one action).

        None when it is no longer recorded (stopped on purpose meanwhile); the running instance
        when someone else restarted it first. The new process is recorded under the stack's lock,
        then awaited without it (`up` and `down` do not wait for a service that is slow to get
        ready). Raises `StackError` when it does not become ready; it then stays recorded with a
        pid that is gone, for the next attempt."""
        with self._locked():
            info = self._require()
            dead = info.services.get(key)
            if dead is None or processes.pid_alive(dead.pid, dead.program):
                return dead
            svc = self._launch_service(info, dead.service, dead.replica)
            svc.restarts, svc.last_restart = dead.restarts + 1, why
            self._save(info)
        self._await_ready(key, svc)
        return svc

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
    # ---- settings -----------------------------------------------------------------------------
    def _requested(self) -> dict[str, str]:
        """The settings this invocation asks for: the environment, then the constructor's roots."""
        requested = stack_settings.requested_from(os.environ)
        if self.data_roots is not None:
            requested[stack_settings.env_name(stack_settings.ROOTS)] = stack_settings.join_roots(
                self.data_roots
            )
        return requested

    def _settings(
        self, previous: StackInfo | None, reconfigure: bool, allow: Iterable[Path]
    ) -> StackSettings:
        """The stored settings (created on first use), changed only as allowed; saved."""
        requested = self._requested()
        try:
            stored = self._load_settings()
            if stored is None:
                stored = StackSettings.create(
                    requested,
                    home_dir=Path.home(),
                    generated_secret=self._secret,
                    legacy=previous.env_vars if previous else None,
                )
            else:
                stored.complete(requested)
                changes = stored.differences(requested)
                if changes:
                    self._refuse_or_apply(stored, changes, reconfigure)
        except SettingsError as exc:
            raise StackError(str(exc)) from exc
        stored.grant(allow)
        _write_private(self.settings_file, stored.model_dump_json(indent=2))
        return stored

    def _refuse_or_apply(
        self, stored: StackSettings, changes: list[Difference], reconfigure: bool
    ) -> None:
        lines = "\n".join(f"  {change.describe()}" for change in changes)
        fixed = [c for c in changes if c.fixed]
        if fixed or not reconfigure:
            how = (
                "unset them to run on the stored settings"
                if fixed
                else "unset them to run on the stored settings, or run `cohortflow stack up "
                "--reconfigure` to store the new values (running services are restarted)"
            )
            raise StackError(
                f"the stack in {self.home} keeps the settings it was created with "
                f"({self.settings_file}); the environment asks for other values:\n{lines}\n{how}"
            )
        stored.apply(changes)

    def _load_settings(self) -> StackSettings | None:
        try:
            return StackSettings.model_validate_json(self.settings_file.read_text())
        except FileNotFoundError:
            return None

    def _sync_env(self, info: StackInfo, stored: StackSettings) -> bool:
        """Put the stored settings into the stack's environment; True when that changed it."""
        before = dict(info.env_vars)
        info.env_vars |= stored.environment()
        return info.env_vars != before

    def _service_env(self, info: StackInfo) -> dict[str, str]:
        """A service's environment: this process's, less every setting, plus the stack's."""
        names = stack_settings.all_setting_names()
        return {k: v for k, v in os.environ.items() if k not in names} | info.env_vars

    def _restart_services(self, info: StackInfo) -> None:
        """Stop and start every running service instance, so each reads the changed settings."""
        for key, svc in list(info.services.items()):
            if processes.pid_alive(svc.pid, svc.program):
                self._stop_process(key, svc)
                self._start_service(info, svc.service, svc.replica)

    def _new_info(self, stored: StackSettings) -> StackInfo:
        ports = {name: processes.free_port() for name in (*INFRA, "gateway")}
        s3_endpoint = f"127.0.0.1:{ports['s3']}"
        db_password = self._secret("db_password")
        env = {
            "COHORTFLOW_HOME": str(self.home),
            "COHORTFLOW_DATABASE_URL": (
                f"postgresql://{DB_ROLE}:{db_password}@127.0.0.1:{ports['postgres']}/{DB_NAME}"
            ),
            "COHORTFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['broker']}",
            "COHORTFLOW_KAFKA_SESSION_TIMEOUT_MS": str(LOCAL_KAFKA_SESSION_TIMEOUT_MS),
            "COHORTFLOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(LOCAL_KAFKA_HEARTBEAT_INTERVAL_MS),
            "COHORTFLOW_S3_ENDPOINT": s3_endpoint,
            "COHORTFLOW_S3_SECURE": "false",
            "COHORTFLOW_GATEWAY_HOST": "127.0.0.1",
            "COHORTFLOW_GATEWAY_PORT": str(ports["gateway"]),
            # the exporter's kept trees live with the stack's other data, never shared by two
            "COHORTFLOW_EXPORT_TREE_CACHE_DIR": str(self.home / "export-trees"),
            **stored.environment(),
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

    def _stop_infra(self, info: StackInfo, name: str) -> None:
        if name != "postgres":
            self._stop_process(name, info.infra[name])
            return
        cluster = self._cluster(info.infra["postgres"].port)
        try:
            cluster.stop()
        except PostgresError:
            pid = cluster.pid
            if pid:
                processes.stop(pid, "postgres", self.stop_timeout)
        info.infra["postgres"].pid = None

    def _cluster(self, port: int) -> PostgresCluster:
        return PostgresCluster.for_home(self.home, port)

    def _cluster_pid(self) -> int | None:
        data = self.home / "postgres" / "data" / "postmaster.pid"
        pid = processes.read_pid(data)
        return pid if processes.pid_alive(pid, "postgres") else None

    # ---- services -----------------------------------------------------------------------------
    def _start_service(self, info: StackInfo, name: str, replica: int) -> ServiceInfo:
        """Launch an instance and wait until it is ready; it is no longer recorded if not."""
        svc = self._launch_service(info, name, replica)
        key = name if replica == 0 else f"{name}-{replica}"
        try:
            self._await_ready(key, svc)
        except StackError:
            info.services.pop(key, None)
            raise
        return svc

    def _launch_service(self, info: StackInfo, name: str, replica: int) -> ServiceInfo:
        """Spawn an instance and record it in `info` (not saved); does not wait."""
        if name not in self.registry:
            raise StackError(f"unknown service {name!r}; registered: {', '.join(self.registry)}")
        key = name if replica == 0 else f"{name}-{replica}"
        previous = info.services.get(key)
        if name == "gateway" and replica == 0:
            port = int(info.env_vars["COHORTFLOW_GATEWAY_PORT"])
        else:
            port = processes.free_port(previous.port if previous else None)
        env = self._service_env(info)
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
            restarts=previous.restarts if previous else 0,
            last_restart=previous.last_restart if previous else None,
        )
        info.services[key] = svc
        svc.pid = self._spawn(key, [*cohortflow_command(), name], Path(svc.log), env).pid
        return svc

    def _await_ready(self, key: str, svc: ServiceInfo) -> None:
        """Wait for the instance's `/readyz`; raises `StackError` (with its log's tail) when it
        exits first, or stops it and raises after `ready_timeout`."""
        handle = self._handles[key]
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = handle.poll()
            if code is not None:
                self.pid_file(key).unlink(missing_ok=True)
                raise StackError(
                    f"service {key} exited with code {code} before it was ready; "
                    f"last lines of {svc.log}:\n{processes.log_tail(Path(svc.log))}"
                )
            if processes.http_ready(f"{svc.url}/readyz"):
                svc.healthy = True
                return
            time.sleep(0.2)
        self._stop_process(key, svc)
        raise StackError(
            f"service {key} did not answer {svc.url}/readyz within {self.ready_timeout:.0f}s; "
            f"last lines of {svc.log}:\n{processes.log_tail(Path(svc.log))}"
        )

    # ---- processes ----------------------------------------------------------------------------
    def _spawn(
        self, name: str, argv: list[str], log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start one of the stack's processes, marked as a member of this stack."""
        env = {**env, processes.MEMBER_ENV: str(self.home)}
        handle = processes.spawn(argv, log, env, self.pid_file(name))
        self._handles[name] = handle
        return handle

    def _supervisor_pid(self) -> int | None:
        pid = processes.read_pid(self.pid_file("supervisor"))
        return pid if processes.pid_alive(pid, SUPERVISOR_MODULE) else None

    def _ensure_supervisor(self, info: StackInfo) -> None:
        """Start the supervisor unless it runs (it watches the services `stack.json` records)."""
        if self._supervisor_pid() is None:
            argv = [sys.executable, "-m", SUPERVISOR_MODULE, "--home", str(self.home)]
            self._spawn("supervisor", argv, self.log_file("supervisor"), self._service_env(info))

    def _stop_supervisor(self) -> None:
        pid = self._supervisor_pid()
        if pid is not None:
            processes.stop(
                pid, SUPERVISOR_MODULE, self.stop_timeout, self._handles.get("supervisor")
            )
        self._reap("supervisor")
        self.pid_file("supervisor").unlink(missing_ok=True)

    def _spawn_and_wait_port(
        self, name: str, proc: ProcessInfo, argv: list[str], env: Mapping[str, str]
    ) -> None:
        handle = self._spawn(name, argv, Path(proc.log), env)
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


def log_line(log_file: Path, message: str) -> None:
    """Append one timestamped line to a log of the stack."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {message}\n")


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
