"""Worker-process pools for a stage's CPU-bound work (parsing headers, de-identifying files).

The pools start their processes from a fork server, not by forking the service itself: the service
runs threads (the event loop's executors, the Kafka client) and a fork copies whatever lock one of
them holds at that instant into a child that can never release it. The fork server is a fresh
interpreter that imports the worker module once (`preload`), so starting a worker stays cheap.
Each worker logs in the service's format.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from shared.observability import configure_logging


def pool_size(config: dict[str, Any], key: str, default: int) -> int:
    """A stage config's pool size (`process_pool_workers`, `scan_thread_workers`, ...), 1 to 64;
    `default` when absent or not a number."""
    value = config.get(key)
    if value is None:
        return default
    try:
        return max(1, min(64, int(value)))
    except (TypeError, ValueError):
        return default


def cpu_workers() -> int:
    """One worker process per CPU of the machine the service runs on."""
    return os.cpu_count() or 2


def _start_worker(service: str) -> None:
    configure_logging(service)


class ProcessPools:
    """One pool per size asked for, created on first use and kept for the service's lifetime."""

    def __init__(self, service: str, preload: list[str]) -> None:
        self.service = service
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)
        self._pools: dict[int, ProcessPoolExecutor] = {}

    def get(self, workers: int) -> ProcessPoolExecutor:
        if workers not in self._pools:
            self._pools[workers] = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=self.context,
                initializer=_start_worker,
                initargs=(self.service,),
            )
        return self._pools[workers]
