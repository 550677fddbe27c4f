"""The compute thread: every computation on one thread, results and errors handed back."""

from __future__ import annotations

import threading

import pytest

from backend.compute_thread import ComputeThread, InlineRunner

pytestmark = pytest.mark.unit


def test_runs_everything_on_one_thread_and_returns_results():
    compute = ComputeThread()
    try:
        seen: set[int] = set()

        def work(x: int) -> int:
            seen.add(threading.get_ident())
            return x * 2

        results: list[int] = []
        callers = [threading.Thread(target=lambda i=i: results.append(compute.run(work, i))) for i in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert sorted(results) == [i * 2 for i in range(8)]
        assert len(seen) == 1 and threading.get_ident() not in seen
        assert compute.run(lambda: compute.run(work, 5)) == 10  # nested calls run inline
    finally:
        compute.close()


def test_errors_reach_the_caller_and_the_thread_survives():
    compute = ComputeThread()
    try:
        with pytest.raises(ZeroDivisionError):
            compute.run(lambda: 1 / 0)
        assert compute.run(lambda: "still here") == "still here"
    finally:
        compute.close()


def test_backend_on_cpu_uses_a_compute_thread(backend):
    assert isinstance(backend.compute, ComputeThread)
    assert InlineRunner().run(lambda a, b: a + b, 1, 2) == 3


def test_runs_in_the_callers_context():
    """Context variables (the log records' request and adapter ids) reach the compute thread."""
    from contextvars import ContextVar

    from backend.compute_thread import ComputeThread

    tag: ContextVar[str | None] = ContextVar("tag", default=None)
    compute = ComputeThread(name="test-context")
    try:
        tag.set("request-1")
        assert compute.run(tag.get) == "request-1"
    finally:
        compute.close()
