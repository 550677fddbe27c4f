"""Durable server state in SQLite (WAL): futures, idempotency keys, API keys, the adapter
registry, checkpoint metadata, the Tinker API's sessions and its recorded sequences. The tables are declared here;
the modules that own each kind of state run their own queries through ``execute``/``query``.

Every future is written when it is submitted and again when it finishes, so that after a
crash (kill -9) and restart: a request that was queued or running answers a clear failure
("the server restarted before this request finished"), never 404; a finished result stays
retrievable for FUTURE_TTL_S; and a request resent with the same ``Idempotency-Key`` gets
the first answer instead of running twice. Model state itself lives in checkpoints
(checkpoints.py); what was not saved is lost in a crash (see docs/operations.md).

On a full disk a write first gives up the disk reserve (diskspace.py) and tries again; what
still fails is an InsufficientStorageError (507), except bookkeeping written with ``record``
(futures, the adapter registry), which is logged and skipped: the work goes on, only its
surviving a restart is lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from thinker.core.errors import InsufficientStorageError
from thinker.store.diskspace import HOW_TO_FREE, is_disk_full
from thinker.store.futures import COMPLETED, FAILED, FutureRecord, jsonable

log = logging.getLogger("thinker.database")
T = TypeVar("T")

RESTARTED = "the server restarted before this request finished; send it again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS futures (
    id TEXT PRIMARY KEY, owner TEXT, kind TEXT, key TEXT, status TEXT, render TEXT,
    result TEXT, error TEXT, error_type TEXT, submitted_at REAL, finished_at REAL,
    request TEXT  -- {"endpoint": "POST /fwdbwd", "request_id": ...}: what asked for it
);
CREATE INDEX IF NOT EXISTS futures_finished ON futures (finished_at);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL, key TEXT NOT NULL, response TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
-- http/auth.py: SHA-256 digests only; source "config" (THINKER_API_KEYS[_FILE]) or "cli" (thinker.keys)
CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY, owner TEXT NOT NULL, label TEXT, source TEXT NOT NULL, created_at REAL NOT NULL
);
-- checkpoints.py: one row per complete checkpoint; its files are under checkpoints/
-- (size_bytes: its files' bytes, summed per owner against MAX_STORAGE_BYTES_PER_USER)
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY, run_id TEXT NOT NULL, owner TEXT, created_at REAL NOT NULL,
    expires_at REAL, info TEXT NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (run_id);
-- checkpoints.py: the seed API's /save_lora exports (adapters/<id>/step_N), counted like checkpoints
CREATE TABLE IF NOT EXISTS exports (
    path TEXT PRIMARY KEY, owner TEXT, size_bytes INTEGER NOT NULL, created_at REAL NOT NULL
);
-- adapter_records.py: every trainable adapter ever created and not deleted; state "live" or "lost"
CREATE TABLE IF NOT EXISTS adapters (
    model_id TEXT PRIMARY KEY, owner TEXT, config TEXT NOT NULL, state TEXT NOT NULL,
    step INTEGER NOT NULL, tokens_trained INTEGER NOT NULL, last_loss REAL, created_at REAL NOT NULL
);
-- http/tinker/sessions.py: client sessions, sampling sessions and each model's next seq_id
CREATE TABLE IF NOT EXISTS tinker_sessions (
    id TEXT PRIMARY KEY, owner TEXT, tags TEXT NOT NULL, user_metadata TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tinker_samplers (
    id TEXT PRIMARY KEY, session_id TEXT, owner TEXT, base_model TEXT NOT NULL, adapter_id TEXT, model_path TEXT
);
-- recorded_sequences.py: sequences sampled with record_stability_info (stable_reinforce trains on them)
CREATE TABLE IF NOT EXISTS recorded_sequences (
    sequence_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT, tokens BLOB NOT NULL,
    logprobs BLOB NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tinker_requests (
    scope TEXT NOT NULL, seq_id INTEGER NOT NULL, future_id TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (scope, seq_id)
);
"""




class Database:
    def __init__(self, path: str | Path, on_full: Callable[[], bool] | None = None) -> None:
        """``on_full``: called when a write finds the disk full; it frees some space (the disk
        reserve, diskspace.py) and says whether it did, and the write is tried once more."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._on_full = on_full
        self._warned_at = 0.0
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._write(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self._write(lambda: self._db.executescript(_SCHEMA))
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(futures)")}
        if "request" not in columns:  # a database from before the column
            self._write(lambda: self._db.execute("ALTER TABLE futures ADD COLUMN request TEXT"))
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")}
        if "size_bytes" not in columns:  # from before storage quotas: the size was in the info only
            self._write(lambda: self._db.executescript(
                "BEGIN; ALTER TABLE checkpoints ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0; "
                "UPDATE checkpoints SET size_bytes = COALESCE(json_extract(info, '$.size_bytes'), 0); COMMIT;"
            ))

    def _write(self, statement: Callable[[], T]) -> T:
        """Run a statement that may need new disk space. A full disk is an InsufficientStorageError
        (507), after one more try if ``on_full`` freed some space. Called under the lock (or in __init__)."""
        retried = False
        while True:
            try:
                return statement()
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                if self._db.in_transaction:
                    self._db.rollback()
                if retried or self._on_full is None or not self._on_full():
                    raise InsufficientStorageError(f"the data disk is full; {HOW_TO_FREE}") from exc
                retried = True

    def execute(self, sql: str, params: tuple = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            return self._write(lambda: self._db.execute(sql, params).rowcount)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def record(self, sql: str, params: tuple, what: str) -> int:
        """``execute`` for bookkeeping the server can run without (it only makes ``what``
        survive a restart): a full disk is logged (once a minute at most) instead of raised, so
        work that needs no disk space is not refused for it."""
        try:
            return self.execute(sql, params)
        except InsufficientStorageError:
            self._degraded(what)
            return 0

    def _degraded(self, what: str) -> None:
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning("the data disk is full: %s was not recorded and will not survive a restart", what)

    def recover(self) -> int:
        """Fail every future that was queued or running when the server stopped."""
        return self.record(
            "UPDATE futures SET status = ?, error = ?, error_type = 'ServerError', finished_at = ? "
            "WHERE status NOT IN (?, ?)",
            (FAILED, RESTARTED, time.time(), COMPLETED, FAILED),
            "the failure of requests the restart interrupted",
        )

    def expire(self, ttl_s: float) -> None:
        horizon = time.time() - ttl_s
        what = "the expiry of old futures"
        self.record("DELETE FROM futures WHERE finished_at IS NOT NULL AND finished_at < ?", (horizon,), what)
        self.record("DELETE FROM idempotency WHERE created_at < ?", (horizon,), what)
        # (each scope's newest row stays: a model's numbering goes on from it after a restart)
        self.record(
            "DELETE FROM tinker_requests WHERE created_at < ? AND seq_id < "
            "(SELECT MAX(seq_id) FROM tinker_requests AS newest WHERE newest.scope = tinker_requests.scope)",
            (horizon,),
            what,
        )

    # Futures are recorded best-effort: on a full disk the job still runs and its result is
    # still served from memory; only its surviving a restart is lost (and logged).
    def future_added(self, future: FutureRecord) -> None:
        self.record(
            "INSERT OR REPLACE INTO futures (id, owner, kind, key, status, submitted_at, request) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (future.id, future.owner, future.kind, future.key, future.status, future.submitted_at,
             json.dumps({k: future.meta[k] for k in ("endpoint", "request_id") if k in future.meta})),
            f"request {future.id}",
        )

    def future_finished(self, future: FutureRecord, result: str | None = None) -> None:
        """``result``: the result already encoded as JSON (encoded here if not)."""
        if result is None and future.status == COMPLETED:
            result = json.dumps(jsonable(future.result))
        self.record(
            "UPDATE futures SET status = ?, render = ?, result = ?, error = ?, error_type = ?, finished_at = ? "
            "WHERE id = ?",
            (future.status, future.meta.get("render"), result, future.error, future.error_type,
             future.finished_at, future.id),
            f"the result of {future.id}",
        )

    def load_future(self, future_id: str) -> FutureRecord | None:
        """A finished future from before a restart (its result as JSON left it)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, owner, kind, key, status, render, result, error, error_type, submitted_at, finished_at, "
                "request FROM futures WHERE id = ? AND finished_at IS NOT NULL",
                (future_id,),
            ).fetchone()
        if row is None:
            return None
        fid, owner, kind, key, status, render, result, error, error_type, submitted, finished, asked = row
        future = FutureRecord(id=fid, key=key, kind=kind, status=status, owner=owner, submitted_at=submitted)
        future.result = json.loads(result) if result is not None else None
        future.error, future.error_type, future.finished_at = error, error_type, finished
        if render:
            future.meta["render"] = render
        future.meta.update(json.loads(asked or "{}"))
        future.done.set()
        return future

    def idempotent_response(self, owner: str | None, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM idempotency WHERE owner IS ? AND key = ?", (owner, key)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def remember_response(self, owner: str | None, key: str, response: dict) -> None:
        self.record(
            "INSERT OR IGNORE INTO idempotency (owner, key, response, created_at) VALUES (?, ?, ?, ?)",
            (owner, key, json.dumps(response), time.time()),
            f"idempotency key {key!r}",
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
