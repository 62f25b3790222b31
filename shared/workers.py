"""Worker-process pools for a stage's CPU-bound work (parsing headers, de-identifying files).

The pools start their processes from a fork server, not by forking the service itself: the service
runs threads (the event loop's executors, the Kafka client) and a fork copies whatever lock one of
them holds at that instant into a child that can never release it. The fork server is a fresh
interpreter that imports the worker module once (`preload`), so starting a worker stays cheap.
Each worker logs in the service's format.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def cpu_workers() -> int:
    """One worker process per CPU of the machine the service runs on."""
    return os.cpu_count() or 2


def _exit_with(service_pid: int, interval_s: float = 1.0) -> None:
    """Leave when the service process is gone (a thread of every worker).

    A worker is the fork server's child, and the fork server hands every worker its own "alive"
    pipe and the pool's queues: when the service is killed with SIGKILL nothing ever reaches EOF,
    so workers and fork server lived on, adopted by init (about 1 GB for four). Polling the
    service's pid is the one signal that cannot be held open."""
    while True:
        time.sleep(interval_s)
        if not process_running(service_pid):
            os._exit(1)


def process_running(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel (a zombie then still counts as running)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] not in ("Z", "X")


def _ready(_: int) -> int:
    """A no-op task (`ProcessPools.warm`): the worker's pid."""
    return os.getpid()


# a worker allocates a header's worth of small dicts and lists per file, nearly all freed by
# reference counting; with the default threshold (700) the cyclic collector ran several times per
# file, and its full passes walked every object the preloaded modules made (measured: ~10 % of a
# worker's parsing CPU)
_WORKER_GC_THRESHOLD = 10_000


def calm_collector() -> None:
    """What exists now (modules, tables, a service's clients) lives as long as the process: moved
    out of the cyclic collector's sight, and young objects collected every `_WORKER_GC_THRESHOLD`
    allocations. For a process that allocates a file's worth of short-lived objects at a time: a
    worker, or the extractor's service process, which unpickles every file's outcome and decodes
    every catalogued record again to build stacks (measured there: 10-15 % of its CPU in the
    collector, its full passes walking every object the service's imports made)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])


def _start_worker(service: str, service_pid: int) -> None:
    # imported here: `process_running` is also what the command line asks of this module, and it
    # need not load the web framework the logging module brings
    from shared.observability import configure_logging

    threading.Thread(target=_exit_with, args=(service_pid,), daemon=True).start()
    configure_logging(service)
    calm_collector()


class ProcessPools:
    """One pool per size asked for, created on first use and kept for the service's lifetime."""

    def __init__(self, service: str, preload: list[str]) -> None:
        self.service = service
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)
        self._pools: dict[int, ProcessPoolExecutor] = {}
        self._started: set[int] = set()  # sizes whose pool has all its processes running
        self._lock = threading.Lock()  # `warm` runs in a thread while items may arrive

    def get(self, workers: int) -> ProcessPoolExecutor:
        with self._lock:
            if workers not in self._pools:
                self._pools[workers] = ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=self.context,
                    initializer=_start_worker,
                    initargs=(self.service, os.getpid()),
                )
            return self._pools[workers]

    async def ready(self, workers: int) -> ProcessPoolExecutor:
        """The pool of `workers` with every process of it running: what the event loop submits to.

        A pool starts a process when a task is submitted while none is idle, and a start waits for
        the fork server's preloaded imports (seconds on a loaded machine). Submitted from the event
        loop, that wait stopped the loop, and the service's broker heartbeats, outbox relay and job
        heartbeats with it: its consumer group rebalanced under it and its job looked stalled. So a
        pool is started in a thread (`start`) before the loop submits to it; a pool a dead worker
        broke (killed, out of memory) is replaced there by a new one."""
        with self._lock:
            pool = self._pools.get(workers)
            if pool is not None and workers in self._started and not _broken(pool):
                return pool
        return await asyncio.to_thread(self.start, workers)

    def start(self, workers: int) -> ProcessPoolExecutor:
        """Blocking: the pool of `workers`, every process started (a broken pool replaced).

        Waits until the pool answered `workers` no-op tasks: a pool spawns a process for each task
        submitted while none is idle, so all are started by then."""
        with self._lock:
            old = self._pools.get(workers)
            if old is not None and _broken(old):
                del self._pools[workers]
                self._started.discard(workers)
                old.shutdown(wait=False, cancel_futures=True)
        pool = self.get(workers)
        list(pool.map(_ready, range(workers)))
        with self._lock:
            self._started.add(workers)
        return pool

    def warm(self, workers: int | None = None) -> int:
        """Start the pool of `workers` (default: one per CPU) now, so the first item does not pay
        the fork server's start and its preloaded imports (measured: 4-6 s on a fresh service).
        Returns the number of processes started."""
        size = workers or cpu_workers()
        return len(self.start(size)._processes or {})


def _broken(pool: ProcessPoolExecutor) -> bool:
    """Whether a worker of the pool died (the executor then fails every task, for good)."""
    return bool(getattr(pool, "_broken", False))
