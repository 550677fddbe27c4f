"""The worker pool: per-key FIFO order, parallelism across keys, failures, long-poll."""

from __future__ import annotations

import random
import threading
import time

import pytest

from thinker.core.errors import BadRequestError, NotFoundError
from thinker.store import futures as futures_module
from thinker.store.futures import COMPLETED, FAILED
from worker_pool import WorkerPool

pytestmark = pytest.mark.unit


@pytest.fixture
def pool():
    p = WorkerPool(4, future_ttl_s=3600)
    yield p
    p.shutdown()


def test_jobs_of_one_key_run_in_submission_order_one_at_a_time(pool):
    log: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    running = {k: 0 for k in log}
    overlap = []

    def job(key: str, i: int):
        def run():
            running[key] += 1
            if running[key] > 1:
                overlap.append(key)
            time.sleep(random.random() * 0.003)  # jitter to vary interleavings; no order depends on it
            log[key].append(i)
            running[key] -= 1
            return i

        return run

    futures = []
    for i in range(40):
        for key in log:
            futures.append(pool.submit(key, "test", job(key, i)))
    for f in futures:
        assert f.wait(10)
    assert not overlap
    assert all(order == list(range(40)) for order in log.values())


def test_different_keys_run_concurrently(pool):
    barrier = threading.Barrier(3, timeout=5)  # only passes if three jobs run at once
    futures = [pool.submit(f"k{i}", "test", barrier.wait) for i in range(3)]
    for f in futures:
        assert f.wait(10)
        assert f.status == COMPLETED


def test_a_failing_job_fails_its_future_and_the_worker_keeps_going():
    pool = WorkerPool(1)
    try:

        def boom():
            raise RuntimeError("kaboom")

        bad = pool.submit("a", "test", boom)
        rejected = pool.submit("a", "test", lambda: (_ for _ in ()).throw(BadRequestError("field x: too big")))
        good = pool.submit("a", "test", lambda: 42)
        assert good.wait(10)
        assert bad.status == FAILED and "RuntimeError: kaboom" in bad.error
        assert rejected.status == FAILED and rejected.error == "field x: too big"
        assert rejected.error_type == "BadRequestError"
        assert good.status == COMPLETED and good.result == 42
    finally:
        pool.shutdown()


class FakeClock:
    """Stands in for the ``time`` module in futures.py: expiry then follows this clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


def test_unknown_and_expired_futures_are_not_found(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(futures_module, "time", clock)
    pool = WorkerPool(1, future_ttl_s=60)
    try:
        with pytest.raises(NotFoundError):
            pool.get("future_nope")
        done = pool.submit(None, "test", lambda: 1)
        assert done.wait(5)
        clock.now += 59
        pool.submit(None, "test", lambda: 2).wait(5)
        assert pool.get(done.id) is done  # within its TTL: kept
        clock.now += 2
        pool.submit(None, "test", lambda: 3).wait(5)  # submitting evicts expired results
        with pytest.raises(NotFoundError):
            pool.get(done.id)
    finally:
        pool.shutdown()


def test_shutdown_fails_queued_jobs_with_a_reason():
    pool = WorkerPool(1)
    started, gate = threading.Event(), threading.Event()
    running = pool.submit("a", "test", lambda: (started.set(), gate.wait(30)))
    queued = pool.submit("a", "test", lambda: 1)
    assert started.wait(10)
    # The running job may finish only once shutdown has failed the queued one.
    threading.Thread(target=lambda: (queued.done.wait(30), gate.set()), daemon=True).start()
    pool.shutdown()
    assert running.status == COMPLETED
    assert queued.status == FAILED and "shut down" in queued.error
