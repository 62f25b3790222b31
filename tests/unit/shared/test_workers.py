"""Worker pools start ahead of the first item when a service asks (`ProcessPools.warm`)."""

from __future__ import annotations

import os

from shared.workers import ProcessPools


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
