"""The worker pool: per-adapter FIFO order, different adapters in parallel, fused passes.

Every job is submitted under a key (an adapter id, or a fresh key for work that touches
no adapter). Each key has its own FIFO queue; a key is "ready" when it has queued jobs
and none running. Workers take ready keys round-robin and run the head job, so jobs of
one adapter run strictly one after another in submission order (a plain lock would not
promise FIFO), jobs of different adapters run at once, and a busy adapter cannot starve
a quiet one.

Fusion: a job may belong to a group ("fwdbwd"). When a worker takes such a job it also
takes the head jobs of that group from other ready keys (and the same key's next jobs of
the group, which see the same weights), within the batch limits, and runs them in one
pass. Only heads are taken, so an adapter's optim_step stays a barrier for that adapter
alone. If other adapters trained recently but have nothing queued yet, the worker waits
up to the batch window for them.

A plain job may return a ``concurrent.futures.Future`` (sampling, which runs in its own
continuous-batching loop): its key stays busy until that future is done.

Shared jobs (``submit(..., shared=True)``: sampling, which only reads the adapter) of one
key run together: a shared job at the head of its queue starts while the key's running
jobs are all shared too. Order is kept against everything else: it still waits for every
earlier job that is not shared, and a later one waits for all of them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinker.core.errors import ServiceUnavailableError, ThinkerError, clip_message
from thinker.obs import logs
from thinker.store.futures import RUNNING, FutureRecord, FutureStore, new_future

log = logging.getLogger("thinker.worker_pool")

# A group runner takes the payloads of one fused batch and returns, per payload, a result
# or the exception that failed it.
GroupRunner = Callable[[list[Any]], list[Any]]

_SERVED_KEPT = 1024  # owners whose last turn is remembered (the fairness order); beyond, the oldest go
_SHUT_DOWN = "the server shut down before this request ran"
_DRAINING = "the server is shutting down and takes no new requests; retry shortly"


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int = 8192  # padded tokens (rows x longest row) in one fused pass
    max_sequences: int = 64  # rows in one fused pass
    window_s: float = 0.005  # how long to wait for more work when others are likely to send


@dataclass
class _Job:
    future: FutureRecord
    fn: Callable[[], Any] | None = None
    group: str | None = None
    payload: Any = None
    rows: int = 0
    length: int = 0
    shared: bool = False  # may run beside the same key's other shared jobs (see module docstring)


class WorkerPool:
    def __init__(
        self,
        num_workers: int,
        future_ttl_s: float = 3600.0,
        runners: dict[str, GroupRunner] | None = None,
        limits: BatchLimits | None = None,
        max_pending: int | None = None,
        max_pending_per_user: int | None = None,
        database=None,
        max_result_bytes: int | None = None,
    ) -> None:
        """``limits=None`` turns fusion off: every job runs on its own. ``max_pending`` and
        ``max_pending_per_user`` bound unfinished futures (in all, and per owner): beyond,
        submitting raises RateLimitError (429). ``max_result_bytes``: finished results kept
        in memory (see FutureStore)."""
        self.num_workers = num_workers
        self.max_pending = max_pending
        self.max_pending_per_user = max_pending_per_user
        self._served: dict[str | None, int] = {}  # owner -> when a worker last took their job (a counter)
        self._turn = 0
        self.runners = runners or {}
        self.limits = limits
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._ready: deque[str] = deque()
        self._running: set[str] = set()  # keys with a job running (a fused pass: each of its keys)
        self._sharing: dict[str, int] = {}  # key -> its shared jobs running (all its running jobs then)
        self._busy = 0  # worker threads running a job or pass now (at most num_workers)
        self._store = FutureStore(future_ttl_s, database, max_result_bytes)  # database: futures outlive the process
        self._recent: dict[str, dict[str, float]] = {}  # group -> key -> last submission time
        self._pass_s: dict[str, float] = {}  # group -> duration of its last pass
        self._gathering: set[str] = set()  # groups a worker is gathering a pass for
        # Groups with a fused pass running. The model runs one pass at a time anyway (one
        # compute thread on CPU, one stream on GPU), so a second pass gathered now would only
        # queue behind it, holding jobs that arrive meanwhile out of the pass after it: a
        # group's next pass is gathered when its running pass is done.
        self._passing: set[str] = set()
        self._closed = False
        self.passes = 0  # runs of a fused group (one per pass)
        self.fused_jobs = 0  # jobs run in those passes
        self.pass_listeners: list[Callable] = []  # listener(group, batch) after each fused pass (must not raise)
        self._threads = [
            threading.Thread(target=self._work, name=f"thinker-worker-{i}", daemon=True) for i in range(num_workers)
        ]
        for thread in self._threads:
            thread.start()

    # ---- submitting and reading ------------------------------------------------------

    def submit(
        self,
        key: str | None,
        kind: str,
        fn: Callable[[], Any],
        future: FutureRecord | None = None,
        shared: bool = False,
    ) -> FutureRecord:
        """Queue ``fn`` behind earlier jobs of ``key`` (None: a key of its own).
        ``future``: one from ``reserve`` to complete, instead of a new one. ``shared``: it
        may run beside the key's other shared jobs (see the module docstring)."""
        return self._enqueue([_Job(future or new_future(key, kind), fn=fn, shared=shared)])[0]

    def submit_fusable(
        self, key: str, kind: str, group: str, payload: Any, rows: int, length: int, future: FutureRecord | None = None
    ) -> FutureRecord:
        """Queue a job that may run fused with other keys' jobs of ``group``; it costs
        ``rows`` sequences of at most ``length`` tokens."""
        if group not in self.runners:
            raise ValueError(f"no runner for group {group!r}")
        job = _Job(future or new_future(key, kind), group=group, payload=payload, rows=rows, length=length)
        return self._enqueue([job])[0]

    def reserve(self, key: str | None, kind: str) -> FutureRecord:
        """A pending future that no job completes yet: pass it to a submit later, or fail it.
        (The API hands out ids for requests it must hold back to run them in order.)"""
        future = new_future(key, kind)
        self._admit([future])
        return future

    def fail(self, future: FutureRecord, error: ThinkerError) -> None:
        """Fail a reserved future that will never run."""
        self._store.finish(future, error=error.message, error_type=type(error).__name__)

    def submit_many(self, items: list[tuple[str, str, str, Any, int, int]]) -> list[FutureRecord]:
        """``submit_fusable`` for several jobs at once, queued atomically: workers see them
        all pending together (as when many users' requests wait behind a running pass)."""
        jobs = []
        for key, kind, group, payload, rows, length in items:
            if group not in self.runners:
                raise ValueError(f"no runner for group {group!r}")
            jobs.append(_Job(new_future(key, kind), group=group, payload=payload, rows=rows, length=length))
        return self._enqueue(jobs)

    def get(self, future_id: str) -> FutureRecord:
        return self._store.get(future_id)  # (not under the pool's lock: it may read the database)

    def stats(self) -> dict:
        with self._cond:
            queued = sum(len(q) for q in self._queues.values())
            return {
                "workers": self.num_workers,
                "queued": queued,
                "running": len(self._running),
                "busy_workers": self._busy,
                "batching": self.limits is not None,
                "fused_passes": self.passes,
                "fused_jobs": self.fused_jobs,
            }

    def pending_by_owner(self) -> dict[str | None, int]:
        """Unfinished futures (queued or running) per owner."""
        return self._store.pending_by_owner()

    def on_finish(self, listener: Callable[[FutureRecord], None]) -> None:
        """Call ``listener(future)`` as each future finishes (on the thread that finishes it,
        outside the pool's lock: several may run at once)."""
        self._store.on_finish.append(listener)

    def shutdown(self, wait: bool = True, drain_s: float = 0.0) -> None:
        """Stop taking jobs; fail queued ones; let running ones finish. ``drain_s``: also
        wait up to this long for running jobs that finish later (sampling in the decode loop)."""
        with self._cond:
            self._closed = True
            stranded = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._ready.clear()
            self._cond.notify_all()
        for job in stranded:
            self._store.finish(job.future, error=_SHUT_DOWN, error_type="ServerError")
        with self._cond:
            deadline = time.monotonic() + drain_s
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        if wait:
            for thread in self._threads:
                thread.join()

    # ---- internals -------------------------------------------------------------------

    def _enqueue(self, jobs: list[_Job]) -> list[FutureRecord]:
        """Admit the jobs' futures (their database rows are written first, off the lock),
        then queue them all at once."""
        if self._closed:
            raise ServiceUnavailableError(_DRAINING)
        self._admit([job.future for job in jobs if job.future.id not in self._store])  # (not reserved ones)
        with self._cond:
            if not self._closed:
                for job in jobs:
                    self._queue_locked(job)
                return [job.future for job in jobs]
        for job in jobs:
            self._store.finish(job.future, error=_SHUT_DOWN, error_type="ServerError")
        raise ServiceUnavailableError(_DRAINING)

    def _queue_locked(self, job: _Job) -> None:
        future = job.future
        if job.group:
            self._recent.setdefault(job.group, {})[future.key] = time.monotonic()
        queue = self._queues.setdefault(future.key, deque())
        queue.append(job)
        if len(queue) == 1 and self._may_start(future.key):
            self._ready.append(future.key)
        self._cond.notify_all()

    def _may_start(self, key: str) -> bool:
        """Whether the head job of ``key`` may start now (its key then goes in the ready line)."""
        if key not in self._running:
            return True
        return self._queues[key][0].shared and key in self._sharing and key not in self._ready

    def _admit(self, futures: list[FutureRecord]) -> None:
        """Add new futures to the store, within the pending limits (RateLimitError beyond)."""
        if self._closed:  # a 503: nothing is wrong with the request, a restarted server takes it
            raise ServiceUnavailableError(_DRAINING)
        for future in futures:
            logs.remember_request(future)  # its job's log records then name the request that sent it
        self._store.admit(futures, self.max_pending, self.max_pending_per_user)

    def _work(self) -> None:
        while True:
            with self._cond:
                key = None
                while not self._closed and (key := self._next_ready_key()) is None:
                    self._cond.wait()
                if self._closed:
                    return
                head = self._queues[key][0]
                if head.group and self.limits is not None:
                    self._gathering.add(head.group)
                    try:
                        batch = self._gather(key, head.group)
                        self._passing.add(head.group)
                    finally:
                        self._gathering.discard(head.group)
                        self._cond.notify_all()
                else:
                    batch = [(key, self._take(key))]
                self._busy += 1
            if batch[0][1].group:
                self._run_group(batch)
            else:
                self._run_plain(*batch[0])  # a job that returns a FutureRecord frees its worker at once
            with self._cond:
                self._busy -= 1

    def _next_ready_key(self) -> str | None:
        """The ready key of the owner served longest ago (fair between users: one who floods
        the queue, with any number of adapters, gets a turn like everyone else), first in
        the ready line among that owner's; jobs of a group another worker is gathering are
        skipped (they belong in that worker's pass, not in a second, smaller one)."""
        best, best_served = None, None
        for key in self._ready:
            head = self._queues[key][0]
            if head.group is not None and self.limits is not None and head.group in self._gathering | self._passing:
                continue
            served = self._served.get(head.future.owner, -1)
            if best is None or served < best_served:
                best, best_served = key, served
        if best is not None:
            self._ready.remove(best)
            self._turn += 1
            self._served[self._queues[best][0].future.owner] = self._turn
            if len(self._served) > _SERVED_KEPT:  # forget the longest-ago half (as unknown owners, they still go first)
                kept = sorted(self._served.items(), key=lambda item: item[1])[_SERVED_KEPT // 2 :]
                self._served = dict(kept)
        return best

    def _take(self, key: str) -> _Job:
        job = self._queues[key].popleft()
        self._running.add(key)
        if job.shared:
            self._sharing[key] = self._sharing.get(key, 0) + 1
            if self._queues[key] and self._may_start(key):  # the next one is shared too
                self._ready.append(key)
        job.future.status, job.future.started_at = RUNNING, time.time()
        return job

    def _gather(self, first_key: str, group: str) -> list[tuple[str, _Job]]:
        """Take ``first_key``'s head and every other fitting head of ``group``
        (called under the lock; may wait, releasing it, for up to the batch window)."""
        limits = self.limits
        picked: list[tuple[str, _Job]] = []
        rows = longest = 0

        def fits(job: _Job) -> bool:
            if not picked:
                return True  # the oldest job always runs, alone if it must
            new_rows, new_longest = rows + job.rows, max(longest, job.length)
            return new_rows <= limits.max_sequences and new_rows * new_longest <= limits.max_tokens

        def take_from(key: str) -> None:
            nonlocal rows, longest
            queue = self._queues[key]
            while queue and queue[0].group == group and fits(queue[0]):
                job = self._take(key)
                picked.append((key, job))
                rows, longest = rows + job.rows, max(longest, job.length)

        take_from(first_key)
        # Wait at most window_s after the latest arrival, and 10 windows in all.
        started = last_join = time.monotonic()
        while True:
            candidates = [k for k in self._ready if self._queues[k][0].group == group]
            # Fill the pass owner by owner (one flooding user cannot crowd the others out),
            # and within that prefer lengths close to the oldest job's: less padding.
            target = picked[0][1].length
            rows_of: dict[str | None, int] = {}
            for _, job in picked:
                rows_of[job.future.owner] = rows_of.get(job.future.owner, 0) + job.rows
            left_out = False  # a waiting job did not fit: the pass is as full as it gets
            while candidates:
                key = min(
                    candidates,
                    key=lambda k: (
                        rows_of.get(self._queues[k][0].future.owner, 0),
                        abs(self._queues[k][0].length - target),
                    ),
                )
                candidates.remove(key)
                head = self._queues[key][0]
                if fits(head):
                    self._ready.remove(key)
                    before = len(picked)
                    take_from(key)
                    rows_of[head.future.owner] = rows_of.get(head.future.owner, 0) + sum(
                        job.rows for _, job in picked[before:]
                    )
                    last_join = time.monotonic()
                else:
                    left_out = True
            left = min(started + 10 * limits.window_s, last_join + limits.window_s) - time.monotonic()
            if left <= 0 or left_out or not self._expect_more(group, {k for k, _ in picked}, rows, longest):
                return picked
            self._cond.wait(left)

    def _expect_more(self, group: str, picked_keys: set[str], rows: int, longest: int) -> bool:
        """Whether another adapter is likely to send a job of ``group`` within the window:
        one that sent one recently and is not in this batch. Keeps a lone user's latency
        free of the window."""
        if rows >= self.limits.max_sequences or rows * longest >= self.limits.max_tokens:
            return False
        # "Recently" scales with how long a pass takes: a user's next request comes about one
        # pass (plus a round trip) after the last one.
        horizon = max(1.0, 200 * self.limits.window_s, 3 * self._pass_s.get(group, 0.0))
        now = time.monotonic()
        recent = self._recent.get(group, {})
        for key, seen in list(recent.items()):
            if now - seen > horizon:
                del recent[key]
            elif key not in picked_keys:
                return True
        return False

    def _run_plain(self, key: str, job: _Job) -> None:
        try:
            result = logs.run_as([job.future], job.fn)  # its log records name its request, adapter, future
        except BaseException as exc:  # noqa: BLE001 - a job's failure must never stop a worker
            result = exc
        if isinstance(result, concurrent.futures.Future):
            result.add_done_callback(lambda f: self._complete([(key, job, f.exception() or f.result())]))
        else:
            self._complete([(key, job, result)])

    def _run_group(self, batch: list[tuple[str, _Job]]) -> None:
        group = batch[0][1].group
        started = time.monotonic()
        try:
            results = logs.run_as([j.future for _, j in batch], self.runners[group], [j.payload for _, j in batch])
        except BaseException as exc:  # noqa: BLE001
            results = [exc] * len(batch)
        with self._cond:
            self._pass_s[group] = time.monotonic() - started
            self.passes += 1
            self.fused_jobs += len(batch)
            self._passing.discard(group)
            self._cond.notify_all()
        for listener in self.pass_listeners:
            listener(group, batch)
        self._complete([(key, job, result) for (key, job), result in zip(batch, results, strict=True)])

    def _complete(self, outcomes: list[tuple[str, _Job, Any]]) -> None:
        """Finish each job with its result or exception (storing and logging it off the
        pool's lock: a slow write holds up these keys only), then free the keys."""
        for key, job, outcome in outcomes:
            if isinstance(outcome, ThinkerError):
                self._store.finish(job.future, error=outcome.message, error_type=type(outcome).__name__)
            elif isinstance(outcome, BaseException):
                trace = "".join(traceback.format_exception(outcome))
                log.error("job %s (%s on %s) failed:\n%s", job.future.id, job.future.kind, key, trace)
                error = clip_message(f"{type(outcome).__name__}: {outcome}")
                self._store.finish(job.future, error=error, error_type="RequestFailedError")
            else:
                self._store.finish(job.future, result=outcome)
        with self._cond:
            for key, job, _ in outcomes:
                if job.shared:
                    self._sharing[key] -= 1
            for key in dict.fromkeys(key for key, _, _ in outcomes):
                if self._sharing.get(key):
                    continue  # other shared jobs of it still run
                self._sharing.pop(key, None)
                self._running.discard(key)
                if self._queues.get(key):
                    if key not in self._ready:
                        self._ready.append(key)
                elif key in self._queues:
                    del self._queues[key]
            self._cond.notify_all()
