"""Where torch runs: one dedicated compute thread on CPU, the calling thread elsewhere.

On a CPU, libgomp (PyTorch's OpenMP) gives every thread that runs torch ops its own team
of helper threads. Once more such threads exist than cores, it switches to "throttled"
spinning and every op pays for sleeping and waking its helpers: measured here on 2 cores,
the same work ran ~1.8x slower as soon as a second worker thread had touched torch. So on
CPU every model computation (training passes, optimizer steps, decode steps) is handed to
one thread and runs at full speed; jobs still interleave fairly in submission order, and
fused passes are where the throughput comes from. On a GPU the threads only queue kernels,
so jobs run on the worker threads themselves.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class InlineRunner:
    """Runs each computation on the calling thread."""

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def close(self) -> None:
        pass


class ComputeThread:
    """Runs each computation on one dedicated thread, in arrival order."""

    def __init__(self, name: str = "thinker-compute") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(*args)  # already there (a computation calling another)
        done: Future = Future()
        # In the caller's context: log records made there keep its request and adapter ids.
        self._queue.put((contextvars.copy_context().run, (fn, *args), done))
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, done = item
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.set_exception(exc)
