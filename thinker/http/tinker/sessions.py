"""What the Tinker API remembers between requests: client sessions, sampling sessions,
and each model's request order.

The SDK numbers every request to a model (``seq_id`` 1, 2, 3, ...) and may POST them out
of order (the chunks of one forward_backward go concurrently, the first one last), and it
resends a request with the same ``seq_id`` when a POST looked lost. ``Sequencer`` hands
out a future id at once, runs a model's requests strictly in ``seq_id`` order, and
answers a resent ``seq_id`` with the id it gave the first time.

All of it is written through to SQLite (database.py), so a restart changes nothing for a
client: its session and sampling sessions are still there, a model's numbering goes on
where it stopped, and a request resent after the restart gets the future id it got
before (whose future then says it finished, or that the restart cut it off).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from thinker.core.errors import BadRequestError
from thinker.store.database import Database
from thinker.store.futures import FutureRecord
from thinker.store.recorded_sequences import RecordedSequences
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
    released: str | None = None  # why its weights are gone (an in-memory snapshot freed or lost)


class Sequencer:
    """One model's requests, released to the worker pool in seq_id order."""

    def __init__(self, pool: WorkerPool, model_id: str, database: Database) -> None:
        self.pool = pool
        self.model_id = model_id
        self.db = database
        last = database.query("SELECT MAX(seq_id) FROM tinker_requests WHERE scope = ?", (model_id,))[0][0]
        self.next_seq = (last or 0) + 1  # after a restart: where the numbering had got to
        self._held: dict[int, tuple[FutureRecord, Callable[[FutureRecord], None], float]] = {}
        self._ids: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def admit(self, seq_id: int | None, kind: str, start: Callable[[FutureRecord], None]) -> str:
        """The future id for this request; ``start(future)`` runs when its turn comes
        (it submits the job to the pool with that future, or fails it)."""
        if not seq_id:  # unnumbered: no order to keep beyond the pool's arrival order
            future = self.pool.reserve(self.model_id, kind)
            start(future)
            return future.id
        with self._lock:
            if (known := self._ids.get(seq_id) or _remembered(self.db, self.model_id, seq_id)) is not None:
                return known  # a resend: the same request (perhaps from before a restart)
            future = self.pool.reserve(self.model_id, kind)
            self._remember(seq_id, future.id)
            _remember(self.db, self.model_id, seq_id, future.id)
            if seq_id < self.next_seq:  # its gap was skipped: running it now would run it out of order
                self.pool.fail(future, BadRequestError(late_message(self.model_id, seq_id)))
                return future.id
            self._held[seq_id] = (future, start, time.monotonic())
            # Started under the lock: released requests reach the pool in seq_id order, even
            # when another thread releases the next ones meanwhile (starts are quick: a submit).
            for held_future, held_start in self._release_locked():
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
            for future, start in self._release_locked(skip_gap=waited):
                start(future)


def late_message(model_id: str, seq_id: int) -> str:
    return (
        f"seq_id {seq_id} of model {model_id} arrived after the server had waited {GAP_TIMEOUT_S:g}s for it "
        "and gone on with the requests after it (the gap was skipped); it was not run, since that would run "
        "it out of order. Resend the work as a new request"
    )


def _remembered(db: Database, scope: str, seq_id: int) -> str | None:
    rows = db.query("SELECT future_id FROM tinker_requests WHERE scope = ? AND seq_id = ?", (scope, seq_id))
    return rows[0][0] if rows else None


def _remember(db: Database, scope: str, seq_id: int, future_id: str) -> None:
    db.record(
        "INSERT OR IGNORE INTO tinker_requests (scope, seq_id, future_id, created_at) VALUES (?, ?, ?, ?)",
        (scope, seq_id, future_id, time.time()),
        f"the request order of {scope}",
    )


class TinkerState:
    def __init__(self, pool: WorkerPool, database: Database) -> None:
        self.pool = pool
        self.db = database
        self._lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        self.samplers: dict[str, Sampler] = {}
        self._sequencers: dict[str, Sequencer] = {}
        self.creations: dict[tuple[str, int], str] = {}  # (session, model_seq_id) -> future id
        self._sample_ids: dict[str, OrderedDict[int, str]] = {}  # sampler -> seq_id -> future id
        self.snapshots: dict[str, list[str]] = {}  # training run -> its in-memory sampler snapshots, oldest first
        self.recorded = RecordedSequences(database)  # sampled with record_stability_info (stable_reinforce)
        self._load()

    def _load(self) -> None:
        """What the last run left in the database."""
        for sid, who, tags, metadata, created in self.db.query(
            "SELECT id, owner, tags, user_metadata, created_at FROM tinker_sessions"
        ):
            self.sessions[sid] = Session(sid, json.loads(tags), json.loads(metadata), who, created)
        for sid, session_id, who, base_model, adapter_id, model_path in self.db.query(
            "SELECT id, session_id, owner, base_model, adapter_id, model_path FROM tinker_samplers"
        ):
            sampler = Sampler(sid, base_model, adapter_id, model_path, who)
            if adapter_id == sid:  # an in-memory snapshot: gone with the process
                sampler.released = "its in-memory snapshot did not survive the server restart"
            self.samplers[sid] = sampler
            if session_id in self.sessions:
                self.sessions[session_id].samplers.append(sid)
        for (model_id,) in self.db.query("SELECT model_id FROM adapters WHERE model_id LIKE '%:train:%'"):
            if (session := self.sessions.get(model_id.split(":train:", 1)[0])) is not None:
                session.models.append(model_id)
        for scope, seq_id, future_id in self.db.query(
            "SELECT scope, seq_id, future_id FROM tinker_requests WHERE scope LIKE 'create:%'"
        ):
            self.creations[(scope.removeprefix("create:"), seq_id)] = future_id

    def new_session(self, tags: list[str], user_metadata: dict[str, str], owner: str | None) -> Session:
        session = Session(f"sess-{secrets.token_hex(6)}", tags, user_metadata, owner)
        with self._lock:
            self.sessions[session.id] = session
        self.db.execute(
            "INSERT INTO tinker_sessions (id, owner, tags, user_metadata, created_at) VALUES (?, ?, ?, ?, ?)",
            (session.id, owner, json.dumps(tags), json.dumps(user_metadata), session.created_at),
        )
        return session

    def session(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def sequencer(self, model_id: str) -> Sequencer:
        with self._lock:
            if model_id not in self._sequencers:
                self._sequencers[model_id] = Sequencer(self.pool, model_id, self.db)
            return self._sequencers[model_id]

    def once(self, key: tuple[str, int], create: Callable[[], str]) -> str:
        """The future id for a model-creating request, created once per (session, seq)."""
        with self._lock:
            if key not in self.creations:
                self.creations[key] = create()
                _remember(self.db, f"create:{key[0]}", key[1], self.creations[key])
            return self.creations[key]

    def sample_once(self, sampler_id: str, seq_id: int, create: Callable[[], str]) -> str:
        """The future id for a sample request, created once per (sampler, seq_id)."""
        scope = f"sample:{sampler_id}"
        with self._lock:
            ids = self._sample_ids.setdefault(sampler_id, OrderedDict())
            if seq_id not in ids:
                ids[seq_id] = _remembered(self.db, scope, seq_id) or create()
                _remember(self.db, scope, seq_id, ids[seq_id])
                while len(ids) > _REMEMBERED_IDS:
                    ids.popitem(last=False)
            return ids[seq_id]

    def add_sampler(self, sampler: Sampler, session_id: str | None) -> Sampler:
        with self._lock:
            self.samplers[sampler.id] = sampler
            if session_id in self.sessions:
                self.sessions[session_id].samplers.append(sampler.id)
        self.db.execute(
            "INSERT OR REPLACE INTO tinker_samplers (id, session_id, owner, base_model, adapter_id, model_path) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (sampler.id, session_id, sampler.owner, sampler.base_model, sampler.adapter_id, sampler.model_path),
        )
        return sampler

    def add_model(self, session_id: str, model_id: str) -> None:
        with self._lock:
            if session_id in self.sessions:
                self.sessions[session_id].models.append(model_id)
