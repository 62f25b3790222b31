"""The local stack's supervisor: restarts a service instance that dies, with backoff (ADR 0019).

`LocalStack.up` (and `start_service`) start it detached, one per state dir, while any service is
recorded; `down` stops it first. It watches the services `stack.json` records; one whose process is
gone (crashed, killed, OOM) is started again through `LocalStack.restart_service`, on the same port
where it is free, after a delay that doubles with each consecutive death (1 s, 2 s, 4 s, ... 60 s)
and is forgotten once the service stayed up a minute. A service stopped on purpose
(`stop_service`, `down`) is no longer recorded, so it stays stopped. Each death and restart is one
line in `logs/supervisor.log`; `cohortflow stack status` shows each instance's restarts.

Postgres, the broker and the S3 server are not restarted: their outages are what the services'
503s and retries are tested against, and `stack up` brings them back.

Run: `python -m cohortflow.stack.supervisor --home STATE_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cohortflow.stack import processes
from cohortflow.stack.launcher import LocalStack, StackError
from shared.observability import configure_logging
from shared.retry import backoff_s

log = logging.getLogger("cohortflow.supervisor")


@dataclass(frozen=True)
class Backoff:
    """How long to wait before the n-th consecutive restart of one instance."""

    initial_s: float = 1.0
    max_s: float = 60.0
    # up this long, an instance's earlier deaths no longer count
    stable_after_s: float = 60.0

    def delay(self, deaths: int) -> float:
        return backoff_s(deaths, self.initial_s, self.max_s)


@dataclass
class _Watch:
    """What the supervisor remembers of one instance between polls."""

    pid: int | None = None
    deaths: int = 0  # consecutive: reset once the instance stayed up `stable_after_s`
    up_since: float = 0.0
    restart_at: float | None = None
    why: str = ""


class Supervisor:
    """Polls the recorded services; restarts the dead ones through the stack's own start code."""

    def __init__(self, stack: LocalStack, backoff: Backoff = Backoff(), poll_s: float = 0.5):
        self.stack = stack
        self.backoff = backoff
        self.poll_s = poll_s
        self.watches: dict[str, _Watch] = {}

    def run(self) -> None:
        log.info("supervising the services of the stack in %s", self.stack.home)
        while self.stack.state_file.exists():
            self.tick(time.monotonic())
            time.sleep(self.poll_s)
        log.info("state file %s is gone; leaving", self.stack.state_file)

    def tick(self, now: float) -> None:
        info = self.stack.recorded()
        if info is None:
            return
        for key in set(self.watches) - set(info.services):
            del self.watches[key]  # stopped on purpose
        for key, svc in info.services.items():
            watch = self.watches.setdefault(key, _Watch(pid=svc.pid, up_since=now))
            if processes.pid_alive(svc.pid, svc.program):
                if watch.pid != svc.pid:  # (re)started by someone: a new life
                    watch.pid, watch.up_since, watch.restart_at = svc.pid, now, None
                if watch.deaths and now - watch.up_since >= self.backoff.stable_after_s:
                    watch.deaths = 0
                continue
            if watch.restart_at is None:
                watch.deaths += 1
                watch.why = self._death(key, svc.pid)
                watch.restart_at = now + self.backoff.delay(watch.deaths)
                log.warning(
                    "%s %s; restart in %.1f s (death %d in a row)",
                    key,
                    watch.why,
                    watch.restart_at - now,
                    watch.deaths,
                )
            elif now >= watch.restart_at:
                self._restart(key, watch, now)

    def _death(self, key: str, pid: int | None) -> str:
        """How the instance ended: its exit status when this process started it, else unknown."""
        handle = self.stack.handle(key)
        code = handle.poll() if handle is not None else None
        if code is None:
            return f"(pid {pid}) is gone"
        if code < 0:
            return f"(pid {pid}) was killed by {signal.Signals(-code).name}"
        return f"(pid {pid}) exited with code {code}"

    def _restart(self, key: str, watch: _Watch, now: float) -> None:
        started = time.monotonic()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            svc = self.stack.restart_service(key, f"{stamp} {key} {watch.why}")
        except StackError as exc:
            watch.deaths += 1
            watch.restart_at = now + self.backoff.delay(watch.deaths)
            log.error(
                "%s did not come back: %s; next attempt in %.1f s",
                key,
                exc,
                watch.restart_at - now,
            )
            return
        if svc is None:
            self.watches.pop(key, None)
            return
        watch.pid, watch.up_since, watch.restart_at = svc.pid, now, None
        log.warning(
            "%s restarted as pid %s, ready in %.1f s (restart %d)",
            key,
            svc.pid,
            time.monotonic() - started,
            svc.restarts,
        )


def _leave(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the stack's state dir")
    args = parser.parse_args(argv)
    configure_logging("supervisor")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness probe
    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGINT, _leave)
    try:
        Supervisor(LocalStack(args.home)).run()
    finally:
        log.info("supervisor stopped")


if __name__ == "__main__":
    main()
