"""What the Tinker API remembers between requests: client sessions, sampling sessions,
and each model's request order.

The SDK numbers every request to a model (``seq_id`` 1, 2, 3, ...) and may POST them out
of order (the chunks of one forward_backward go concurrently, the first one last), and it
resends a request with the same ``seq_id`` when a POST looked lost. ``Sequencer`` hands
out a future id at once, runs a model's requests strictly in ``seq_id`` order, and
answers a resent ``seq_id`` with the id it gave the first time.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from futures import Future
from worker_pool import WorkerPool

log = logging.getLogger("thinker.tinker")

IDLE_BEFORE_FREEING_S = 60.0  # frozen sampler weights unused this long (and not pinned) may be freed
GAP_TIMEOUT_S = 30.0  # a missing seq_id (a POST that never arrived) holds later ones this long at most
_REMEMBERED_IDS = 4096  # (seq_id -> future id) pairs kept per model and per sampler, for resends


@dataclass
class Session:
    id: str
    tags: list[str]
    user_metadata: dict[str, str]
    owner: str | None = None
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: bool = False
    models: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)


@dataclass
class Sampler:
    """A sampling session: what it samples from."""

    id: str
    base_model: str
    adapter_id: str | None  # None: the base model
    model_path: str | None = None  # tinker:// path it was created from, if any
    owner: str | None = None
    released: bool = False  # its snapshot weights were freed (newer snapshots replaced them)


class Sequencer:
    """One model's requests, released to the worker pool in seq_id order."""

    def __init__(self, pool: WorkerPool, model_id: str) -> None:
        self.pool = pool
        self.model_id = model_id
        self.next_seq = 1
        self._held: dict[int, tuple[Future, Callable[[Future], None], float]] = {}
        self._ids: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def admit(self, seq_id: int | None, kind: str, start: Callable[[Future], None]) -> str:
        """The future id for this request; ``start(future)`` runs when its turn comes
        (it submits the job to the pool with that future, or fails it)."""
        if not seq_id:  # unnumbered: no order to keep beyond the pool's arrival order
            future = self.pool.reserve(self.model_id, kind)
            start(future)
            return future.id
        with self._lock:
            if seq_id in self._ids:
                return self._ids[seq_id]  # a resend: the same request
            future = self.pool.reserve(self.model_id, kind)
            self._remember(seq_id, future.id)
            if seq_id < self.next_seq:  # late, after we gave up waiting for it: run it now
                ready = [(future, start)]
            else:
                self._held[seq_id] = (future, start, time.monotonic())
                ready = self._release_locked()
        for held_future, held_start in ready:
            held_start(held_future)
        return future.id

    def _remember(self, seq_id: int, future_id: str) -> None:
        self._ids[seq_id] = future_id
        while len(self._ids) > _REMEMBERED_IDS:
            self._ids.popitem(last=False)

    def _release_locked(self, skip_gap: bool = False) -> list:
        ready = []
        if skip_gap and self._held and self.next_seq not in self._held:
            missing = self.next_seq
            self.next_seq = min(self._held)
            log.warning(
                "model %s: seq_id %d..%d never arrived; going on without", self.model_id, missing, self.next_seq - 1
            )
        while self.next_seq in self._held:
            future, start, _ = self._held.pop(self.next_seq)
            ready.append((future, start))
            self.next_seq += 1
        if self._held and self._timer is None:
            self._timer = threading.Timer(GAP_TIMEOUT_S, self._gap_expired)
            self._timer.daemon = True
            self._timer.start()
        return ready

    def _gap_expired(self) -> None:
        with self._lock:
            self._timer = None
            oldest = min((since for _, _, since in self._held.values()), default=None)
            waited = oldest is not None and time.monotonic() - oldest >= GAP_TIMEOUT_S - 0.01
            ready = self._release_locked(skip_gap=waited)
        for future, start in ready:
            start(future)


class TinkerState:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        self.samplers: dict[str, Sampler] = {}
        self._sequencers: dict[str, Sequencer] = {}
        self.creations: dict[tuple[str, int], str] = {}  # (session, model_seq_id) -> future id
        self._sample_ids: dict[str, OrderedDict[int, str]] = {}  # sampler -> seq_id -> future id
        self.snapshots: dict[str, list[str]] = {}  # training run -> its in-memory sampler snapshots, oldest first

    def new_session(self, tags: list[str], user_metadata: dict[str, str], owner: str | None) -> Session:
        session = Session(f"sess-{secrets.token_hex(6)}", tags, user_metadata, owner)
        with self._lock:
            self.sessions[session.id] = session
        return session

    def session(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def sequencer(self, model_id: str) -> Sequencer:
        with self._lock:
            if model_id not in self._sequencers:
                self._sequencers[model_id] = Sequencer(self.pool, model_id)
            return self._sequencers[model_id]

    def once(self, key: tuple[str, int], create: Callable[[], str]) -> str:
        """The future id for a model-creating request, created once per (session, seq)."""
        with self._lock:
            if key not in self.creations:
                self.creations[key] = create()
            return self.creations[key]

    def sample_once(self, sampler_id: str, seq_id: int, create: Callable[[], str]) -> str:
        """The future id for a sample request, created once per (sampler, seq_id)."""
        with self._lock:
            ids = self._sample_ids.setdefault(sampler_id, OrderedDict())
            if seq_id not in ids:
                ids[seq_id] = create()
                while len(ids) > _REMEMBERED_IDS:
                    ids.popitem(last=False)
            return ids[seq_id]

    def add_sampler(self, sampler: Sampler, session_id: str | None) -> Sampler:
        with self._lock:
            self.samplers[sampler.id] = sampler
            if session_id in self.sessions:
                self.sessions[session_id].samplers.append(sampler.id)
        return sampler

    def add_model(self, session_id: str, model_id: str) -> None:
        with self._lock:
            if session_id in self.sessions:
                self.sessions[session_id].models.append(model_id)
