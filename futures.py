"""Futures: the handle a client polls for the result of a queued job."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from errors import NotFoundError

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"

# Who the request being handled on this thread is from (set by auth.py); a future belongs
# to whoever's request created it.
current_owner: ContextVar[str | None] = ContextVar("thinker_owner", default=None)


@dataclass
class Future:
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


def new_future(key: str | None, kind: str) -> Future:
    return Future(id=f"future_{secrets.token_hex(8)}", key=key or f"solo_{secrets.token_hex(8)}", kind=kind)


def not_found(future_id: str) -> str:
    return f"request_id {future_id!r} is unknown (never issued, or expired)"


class FutureStore:
    """Every future by id; finished ones are forgotten ``ttl_s`` seconds after finishing.
    Not locked itself: the worker pool calls it under its own lock."""

    def __init__(self, ttl_s: float, database=None) -> None:
        """``database``: a database.Database to write futures through to (they then outlive
        the process: see database.py)."""
        self.ttl_s = ttl_s
        self.database = database
        self._expired_db_at = 0.0
        self._futures: dict[str, Future] = {}
        self._finished: deque[Future] = deque()  # in finishing order, for eviction
        self.unfinished: dict[str | None, int] = {}  # owner -> futures not finished yet
        self.unfinished_total = 0
        # Called with each future as it finishes, under the pool's lock: keep them quick
        # (metrics, the dashboard's recent-requests list).
        self.on_finish: list[Callable[[Future], None]] = []

    def add(self, future: Future) -> None:
        self._evict_expired()
        self._futures[future.id] = future
        self.unfinished[future.owner] = self.unfinished.get(future.owner, 0) + 1
        self.unfinished_total += 1
        if self.database is not None:
            self.database.future_added(future)

    def __contains__(self, future_id: str) -> bool:
        return future_id in self._futures

    def get(self, future_id: str) -> Future:
        future = self._futures.get(future_id)
        if future is None and self.database is not None:
            future = self.database.load_future(future_id)  # from before a restart
        if future is None:
            raise NotFoundError(not_found(future_id))
        return future

    def finish(
        self, future: Future, result: Any = None, error: str | None = None, error_type: str | None = None
    ) -> None:
        if future.done.is_set():
            return  # finished already (a reserved future failed at shutdown, say)
        future.result, future.error, future.error_type = result, error, error_type
        future.status = FAILED if error is not None else COMPLETED
        future.finished_at = time.time()
        self.unfinished[future.owner] -= 1
        self.unfinished_total -= 1
        self._finished.append(future)
        if self.database is not None:
            self.database.future_finished(future)
        for listener in self.on_finish:
            try:
                listener(future)
            except Exception:  # an observer's bug must not lose the result
                logging.getLogger("thinker.futures").exception("on_finish listener failed")
        future.done.set()

    def _evict_expired(self) -> None:
        now = time.time()
        if self.database is not None and now - self._expired_db_at > 60:
            self._expired_db_at = now
            self.database.expire(self.ttl_s)
        horizon = now - self.ttl_s
        while self._finished and (self._finished[0].finished_at or 0) < horizon:
            self._futures.pop(self._finished.popleft().id, None)
