"""The exporter's transfers (a stack's sources, its uploads, a tree's sync) run on one pool of
threads the whole process shares, each call's work cut into one share per thread (ADR 0036)."""

from __future__ import annotations

import threading
import time

import pytest

from services.exporter import plugin
from services.exporter.plugin import _parallel


def test_results_come_back_in_the_order_of_the_work() -> None:
    work = list(range(1000))
    assert _parallel(work, lambda x: x * x) == [x * x for x in work]
    assert _parallel(iter(range(3)), str) == ["0", "1", "2"]


def test_nothing_or_one_item_runs_in_the_calling_thread() -> None:
    caller = threading.current_thread()
    assert _parallel([], lambda x: x) == []
    assert _parallel([1], lambda _: threading.current_thread()) == [caller]


def test_every_call_uses_the_same_few_threads() -> None:
    def name(_: int) -> str:
        time.sleep(0.001)  # long enough for the shares to spread over the threads
        return threading.current_thread().name

    names = set(_parallel(range(64), name)) | set(_parallel(range(64), name))
    assert names and all(n.startswith("transfer") for n in names)
    assert len(names) <= plugin._TRANSFER_THREADS
    assert plugin._transfer_threads() is plugin._transfer_threads()


def test_an_error_is_raised_once_every_share_has_ended() -> None:
    """A caller removes what the work wrote into once the call raised: nothing may still run."""
    done: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        if x == 0:
            raise RuntimeError("item 0 failed")
        time.sleep(0.01)
        with lock:
            done.append(x)
        return x

    with pytest.raises(RuntimeError, match="item 0 failed"):
        _parallel(range(16), fn)
    finished = len(done)
    time.sleep(0.05)
    # item 0's share stopped at its error; every other share had finished before the raise
    assert len(done) == finished
    assert set(done) >= set(range(16)) - set(range(0, 16, plugin._TRANSFER_THREADS))
