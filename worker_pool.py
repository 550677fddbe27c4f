"""Futures and the worker pool: per-adapter FIFO order, different adapters in parallel.

Every job is submitted under a key (an adapter id, or a fresh key for work that touches
no adapter). Each key has its own FIFO queue; a key is "ready" when it has queued jobs
and none running. Workers take ready keys round-robin, run the head job, then put the
key back at the end of the ready line if more is queued. So jobs of one adapter run
strictly one after another in submission order (a plain lock would not promise FIFO),
jobs of different adapters run on different threads at once, and a busy adapter cannot
starve a quiet one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from errors import NotFoundError, ThinkerError

log = logging.getLogger("thinker.worker_pool")

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"


@dataclass
class Future:
    id: str
    key: str
    kind: str  # "add_lora", "fwdbwd", ...: for logs and metrics
    status: str = PENDING
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None) -> bool:
        """Block until the job finished or ``timeout`` seconds passed; True if finished."""
        return self.done.wait(timeout)


@dataclass
class _Job:
    future: Future
    fn: Callable[[], Any]


class WorkerPool:
    def __init__(self, num_workers: int, future_ttl_s: float = 3600.0) -> None:
        self.num_workers = num_workers
        self.future_ttl_s = future_ttl_s
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._ready: deque[str] = deque()
        self._running: set[str] = set()
        self._futures: dict[str, Future] = {}
        self._finished: deque[Future] = deque()  # in finishing order, for TTL eviction
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"thinker-worker-{i}", daemon=True) for i in range(num_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: str | None, kind: str, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` behind earlier jobs of ``key`` (None: a key of its own)."""
        future = Future(id=f"future_{secrets.token_hex(8)}", key=key or f"solo_{secrets.token_hex(8)}", kind=kind)
        with self._cond:
            if self._closed:
                raise ThinkerError("the server is shutting down")
            self._evict_expired()
            self._futures[future.id] = future
            queue = self._queues.setdefault(future.key, deque())
            queue.append(_Job(future, fn))
            if len(queue) == 1 and future.key not in self._running:
                self._ready.append(future.key)
                self._cond.notify()
        return future

    def get(self, future_id: str) -> Future:
        future = self._futures.get(future_id)
        if future is None:
            raise NotFoundError(f"request_id {future_id!r} is unknown (never issued, or expired)")
        return future

    def stats(self) -> dict:
        with self._cond:
            queued = sum(len(q) for q in self._queues.values())
            return {"workers": self.num_workers, "queued": queued, "running": len(self._running)}

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; fail queued ones; let running ones finish."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for job in queue:
                    self._finish(
                        job.future, error="the server shut down before this request ran", error_type="ServerError"
                    )
            self._queues.clear()
            self._ready.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    # ---- internals -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = self._ready.popleft()
                job = self._queues[key].popleft()
                self._running.add(key)
                job.future.status = RUNNING
                job.future.started_at = time.time()
            result, error, error_type = None, None, None
            try:
                result = job.fn()
            except ThinkerError as exc:
                error, error_type = exc.message, type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - a job's failure must never stop a worker
                error, error_type = f"{type(exc).__name__}: {exc}", "RequestFailedError"
                log.error("job %s (%s on %s) failed:\n%s", job.future.id, job.future.kind, key, traceback.format_exc())
            with self._cond:
                self._finish(job.future, result=result, error=error, error_type=error_type)
                self._running.discard(key)
                if self._queues.get(key):
                    self._ready.append(key)
                    self._cond.notify()
                elif key in self._queues:
                    del self._queues[key]

    def _finish(
        self, future: Future, result: Any = None, error: str | None = None, error_type: str | None = None
    ) -> None:
        future.result, future.error, future.error_type = result, error, error_type
        future.status = FAILED if error is not None else COMPLETED
        future.finished_at = time.time()
        self._finished.append(future)
        future.done.set()
        if error is not None:
            log.info("future %s (%s on %s) failed: %s", future.id, future.kind, future.key, error)

    def _evict_expired(self) -> None:
        horizon = time.time() - self.future_ttl_s
        while self._finished and (self._finished[0].finished_at or 0) < horizon:
            self._futures.pop(self._finished.popleft().id, None)
