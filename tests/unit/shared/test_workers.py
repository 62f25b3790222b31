"""Worker pools start ahead of the first item when a service asks (`ProcessPools.warm`), and
the event loop never waits for a pool's processes to start (`ProcessPools.ready`)."""

from __future__ import annotations

import asyncio
import multiprocessing.forkserver
import os
import time
from typing import Any

from shared.workers import ProcessPools, _ready

# what the extractor's fork server preloads (pydicom, numpy, the C reader): seconds to import on
# a loaded machine, during which a pool's first process start waits
WORKER_MODULE = "services.extractor.worker"


def _stop_fork_server() -> None:
    """The process's fork server (one per process, started by the first pool): the next pool
    starts a fresh one, which preloads that pool's modules."""
    server: Any = multiprocessing.forkserver._forkserver
    server._stop()


def test_warm_starts_every_worker_of_the_pool() -> None:
    pools = ProcessPools("test", [])
    try:
        assert pools.warm(2) == 2
        pool = pools.get(2)  # the same pool the first item will use
        processes = pool._processes  # what "started" means for the executor
        assert len(processes) == 2
        assert all(p.is_alive() and p.pid != os.getpid() for p in processes.values())
    finally:
        pools.get(2).shutdown()


async def test_the_event_loop_goes_on_while_a_pool_starts_and_a_broken_pool_is_replaced() -> None:
    """Submitting to a pool whose processes are not started blocked the event loop until the fork
    server had imported the worker module (measured: 7.9 s on a loaded machine, the service's
    broker and job heartbeats stopped with it). `ready` starts the pool in a thread."""
    # the fork server is one per process, started by the first pool: a fresh one preloads
    _stop_fork_server()
    pools = ProcessPools("test", [WORKER_MODULE])
    lags: list[float] = []

    async def tick() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.02)
            lags.append(time.perf_counter() - started - 0.02)

    ticking = asyncio.create_task(tick())
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.1)  # ticking
        pool = await pools.ready(2)
        assert await asyncio.gather(*(loop.run_in_executor(pool, _ready, i) for i in range(2)))
        assert len(lags) > 5 and max(lags) < 0.5, max(lags)
        assert await pools.ready(2) is pool  # started once

        for process in list(pool._processes.values()):  # a worker killed: the pool is broken
            process.kill()
        while not getattr(pool, "_broken", False):
            await asyncio.sleep(0.02)
        again = await pools.ready(2)
        assert again is not pool
        assert await loop.run_in_executor(again, _ready, 0) > 0
    finally:
        ticking.cancel()
        for size_pool in list(pools._pools.values()):
            size_pool.shutdown()
        _stop_fork_server()  # the next pool preloads its own modules
