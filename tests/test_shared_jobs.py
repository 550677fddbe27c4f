"""Shared jobs (sampling) of one key run together; order against the key's other jobs holds."""

from __future__ import annotations

import threading

import pytest

from thinker.store.futures import COMPLETED
from worker_pool import WorkerPool

pytestmark = pytest.mark.unit


@pytest.fixture
def pool():
    p = WorkerPool(4, future_ttl_s=3600)
    yield p
    p.shutdown()


def test_shared_jobs_of_one_key_run_at_once(pool):
    barrier = threading.Barrier(3, timeout=10)  # passes only if three jobs of key "a" run together
    futures = [pool.submit("a", "sample", barrier.wait, shared=True) for _ in range(3)]
    for f in futures:
        assert f.wait(20)
        assert f.status == COMPLETED, f.error


def test_shared_jobs_that_return_futures_keep_the_key_busy_together(pool):
    """Like sampling with batching: the job hands back a Future; the next shared job of the
    key starts while the first one's future is still open."""
    import concurrent.futures

    opened: list[concurrent.futures.Future] = []
    both_open = threading.Event()

    def sample():
        future: concurrent.futures.Future = concurrent.futures.Future()
        opened.append(future)
        if len(opened) == 2:
            both_open.set()
        return future

    first, second = pool.submit("a", "sample", sample, shared=True), pool.submit("a", "sample", sample, shared=True)
    assert both_open.wait(10)
    later = pool.submit("a", "optim_step", lambda: "stepped")
    for f in opened:
        f.set_result("done")
    assert first.wait(10) and second.wait(10) and later.wait(10)
    assert later.result == "stepped"


def test_a_plain_job_between_shared_ones_keeps_its_place(pool):
    """sample, optim_step, sample on one key: the step waits for the first sample, and the
    second sample for the step (it must see the stepped weights)."""
    events: list[str] = []
    release_first = threading.Event()
    first_started = threading.Event()

    def first():
        events.append("sample1 start")
        first_started.set()
        assert release_first.wait(10)
        events.append("sample1 end")

    def step():
        events.append("step")

    def second():
        events.append("sample2")

    futures = [pool.submit("a", "sample", first, shared=True)]
    assert first_started.wait(10)
    futures += [pool.submit("a", "optim_step", step), pool.submit("a", "sample", second, shared=True)]
    # Neither may start while the first sample runs: the step is not shared, the second
    # sample is behind the step.
    release_first.set()
    for f in futures:
        assert f.wait(10)
    assert events == ["sample1 start", "sample1 end", "step", "sample2"]
