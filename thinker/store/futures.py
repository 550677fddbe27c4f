"""Futures: the handle a client polls for the result of a queued job."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from thinker.core.errors import NotFoundError, RateLimitError

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"

log = logging.getLogger("thinker.futures")

# Who the request being handled on this thread is from (set by auth.py); a future belongs
# to whoever's request created it.
current_owner: ContextVar[str | None] = ContextVar("thinker_owner", default=None)


@dataclass
class FutureRecord:
    """One request's lifecycle (queued, running, completed or failed) and its result: what
    ``retrieve_future`` answers. Not a ``concurrent.futures.Future``: nothing waits on it directly."""

    id: str
    key: str  # the queue it ran in: an adapter id, or a key of its own
    kind: str  # "add_lora", "fwdbwd", ...: for logs and metrics
    status: str = PENDING
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    meta: dict = field(default_factory=dict)  # what the API layer needs to render the result
    owner: str | None = field(default_factory=current_owner.get)

    def wait(self, timeout: float | None) -> bool:
        """Block until the job finished or ``timeout`` seconds passed; True if finished."""
        return self.done.wait(timeout)


def new_future(key: str | None, kind: str) -> FutureRecord:
    return FutureRecord(id=f"future_{secrets.token_hex(8)}", key=key or f"solo_{secrets.token_hex(8)}", kind=kind)


def not_found(future_id: str) -> str:
    return f"request_id {future_id!r} is unknown (never issued, or expired)"


class FutureStore:
    """Every future by id; finished ones are forgotten ``ttl_s`` seconds after finishing,
    or sooner, oldest first, while the finished results held exceed ``max_result_bytes``
    (with a database they stay readable from it: only the in-memory copy goes).

    Its own lock guards the in-memory maps only: the database writes, the JSON encoding of
    results and the ``on_finish`` listeners run outside every lock, so one slow write or
    log handler holds up the future it is about and nothing else."""

    def __init__(self, ttl_s: float, database=None, max_result_bytes: int | None = None) -> None:
        """``database``: a database.Database to write futures through to (they then outlive
        the process: see database.py)."""
        self.ttl_s = ttl_s
        self.database = database
        self.max_result_bytes = max_result_bytes
        self._lock = threading.Lock()
        self._expired_db_at = 0.0
        self._futures: dict[str, FutureRecord] = {}
        # Finished futures whose result is stored, in finishing order, with their result's
        # size (JSON bytes): what eviction takes from, oldest first.
        self._finished: deque[tuple[FutureRecord, int]] = deque()
        self.result_bytes = 0  # sum of those sizes
        self._unfinished: dict[str | None, int] = {}  # owner -> futures not finished yet (no zeros kept)
        self.unfinished_total = 0
        # Called with each future as it finishes, on the finishing thread, outside every
        # lock (metrics, logs, the dashboard's recent-requests list); they may run at once.
        self.on_finish: list[Callable[[FutureRecord], None]] = []

    def admit(
        self, futures: list[FutureRecord], max_pending: int | None = None, max_per_owner: int | None = None
    ) -> None:
        """Add new futures, all or none: RateLimitError if that would exceed the pending
        limits. Their database rows are written before this returns (so before a job can
        finish), outside the lock."""
        with self._lock:
            self._evict_locked()
            try:
                for future in futures:
                    self._check_limits_locked(future.owner, max_pending, max_per_owner)
                    self._futures[future.id] = future
                    self._count_locked(future.owner, +1)
            except RateLimitError:
                self._forget_locked(futures)  # (new futures: only this call added them)
                raise
            expire = self.database is not None and time.time() - self._expired_db_at > 60
            if expire:
                self._expired_db_at = time.time()
        if self.database is None:
            return
        try:
            if expire:
                self.database.expire(self.ttl_s)
            for future in futures:
                self.database.future_added(future)
        except BaseException:
            with self._lock:  # never admitted after all
                self._forget_locked(futures)
            raise

    def _check_limits_locked(self, owner: str | None, max_pending: int | None, max_per_owner: int | None) -> None:
        if max_pending is not None and self.unfinished_total >= max_pending:
            raise RateLimitError(f"the server has {self.unfinished_total} unfinished requests; retry shortly")
        mine = self._unfinished.get(owner, 0)
        if max_per_owner is not None and mine >= max_per_owner:
            raise RateLimitError(
                f"you have {mine} unfinished requests (the limit is {max_per_owner}); wait for some results, then retry"
            )

    def _forget_locked(self, futures: list[FutureRecord]) -> None:
        for future in futures:
            if self._futures.pop(future.id, None) is not None:
                self._count_locked(future.owner, -1)

    def __contains__(self, future_id: str) -> bool:
        return future_id in self._futures

    def get(self, future_id: str) -> FutureRecord:
        with self._lock:
            future = self._futures.get(future_id)
        if future is None and self.database is not None:
            future = self.database.load_future(future_id)  # evicted from memory, or from before a restart
        if future is None:
            raise NotFoundError(not_found(future_id))
        return future

    def pending_by_owner(self) -> dict[str | None, int]:
        with self._lock:
            return dict(self._unfinished)

    def finish(
        self, future: FutureRecord, result: Any = None, error: str | None = None, error_type: str | None = None
    ) -> None:
        with self._lock:
            if future.status in (COMPLETED, FAILED):
                return  # finished already (a reserved future failed at shutdown, say)
            future.result, future.error, future.error_type = result, error, error_type
            future.finished_at = time.time()
            future.status = FAILED if error is not None else COMPLETED
            self._count_locked(future.owner, -1)
        encoded = None
        if future.status == COMPLETED and (self.database is not None or self.max_result_bytes is not None):
            encoded = _encode(future.result)
        if self.database is not None:
            try:
                self.database.future_finished(future, encoded)
            except Exception:  # the waiting client still gets its answer from memory
                log.exception("could not store the outcome of %s", future.id)
        for listener in self.on_finish:
            try:
                listener(future)
            except Exception:  # an observer's bug must not lose the result
                log.exception("on_finish listener failed")
        future.done.set()
        size = len(encoded) if encoded is not None else len(error or "")
        with self._lock:  # evictable only now that the database has it
            if future.id in self._futures:
                self._finished.append((future, size))
                self.result_bytes += size
            self._evict_locked()

    def _count_locked(self, owner: str | None, delta: int) -> None:
        left = self._unfinished.get(owner, 0) + delta
        if left:
            self._unfinished[owner] = left
        else:  # one entry per owner with work, not per owner ever seen
            self._unfinished.pop(owner, None)
        self.unfinished_total += delta

    def _evict_locked(self) -> None:
        horizon = time.time() - self.ttl_s
        limit = self.max_result_bytes
        while self._finished and (
            (self._finished[0][0].finished_at or 0) < horizon or (limit is not None and self.result_bytes > limit)
        ):
            future, size = self._finished.popleft()
            self.result_bytes -= size
            self._futures.pop(future.id, None)


def _encode(result: Any) -> str:
    """The result as JSON (what the database stores; its length is what the cache counts)."""

    return json.dumps(jsonable(result), default=repr)

def jsonable(value):
    """A result as JSON can carry it (tensors and arrays become lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value
