"""Durable server state in SQLite (WAL): futures, idempotency keys, API keys, the adapter
registry, checkpoint metadata and the Tinker API's sessions. The tables are declared here;
the modules that own each kind of state run their own queries through ``execute``/``query``.

Every future is written when it is submitted and again when it finishes, so that after a
crash (kill -9) and restart: a request that was queued or running answers a clear failure
("the server restarted before this request finished"), never 404; a finished result stays
retrievable for FUTURE_TTL_S; and a request resent with the same ``Idempotency-Key`` gets
the first answer instead of running twice. Model state itself lives in checkpoints
(checkpoints.py); what was not saved is lost in a crash (see README).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from futures import COMPLETED, FAILED, Future

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
-- auth.py: SHA-256 digests only; source "config" (THINKER_API_KEYS[_FILE]) or "cli" (keys.py)
CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY, owner TEXT NOT NULL, label TEXT, source TEXT NOT NULL, created_at REAL NOT NULL
);
-- checkpoints.py: one row per complete checkpoint; its files are under checkpoints/
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY, run_id TEXT NOT NULL, owner TEXT, created_at REAL NOT NULL,
    expires_at REAL, info TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (run_id);
-- registry.py: every trainable adapter ever created and not deleted; state "live" or "lost"
CREATE TABLE IF NOT EXISTS adapters (
    model_id TEXT PRIMARY KEY, owner TEXT, config TEXT NOT NULL, state TEXT NOT NULL,
    step INTEGER NOT NULL, tokens_trained INTEGER NOT NULL, last_loss REAL, created_at REAL NOT NULL
);
-- tinker_api/sessions.py: client sessions, sampling sessions and each model's next seq_id
CREATE TABLE IF NOT EXISTS tinker_sessions (
    id TEXT PRIMARY KEY, owner TEXT, tags TEXT NOT NULL, user_metadata TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tinker_samplers (
    id TEXT PRIMARY KEY, session_id TEXT, owner TEXT, base_model TEXT NOT NULL, adapter_id TEXT, model_path TEXT
);
CREATE TABLE IF NOT EXISTS tinker_requests (
    scope TEXT NOT NULL, seq_id INTEGER NOT NULL, future_id TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (scope, seq_id)
);
"""


def jsonable(value):
    """A result as JSON can carry it (tensors and arrays become lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


class Database:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(futures)")}
        if "request" not in columns:  # a database from before the column
            self._db.execute("ALTER TABLE futures ADD COLUMN request TEXT")
        self._lock = threading.Lock()

    def execute(self, sql: str, params: tuple = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def recover(self) -> int:
        """Fail every future that was queued or running when the server stopped."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE futures SET status = ?, error = ?, error_type = 'ServerError', finished_at = ? "
                "WHERE status NOT IN (?, ?)",
                (FAILED, RESTARTED, time.time(), COMPLETED, FAILED),
            )
            return cursor.rowcount

    def expire(self, ttl_s: float) -> None:
        horizon = time.time() - ttl_s
        with self._lock:
            self._db.execute("DELETE FROM futures WHERE finished_at IS NOT NULL AND finished_at < ?", (horizon,))
            self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (horizon,))
            # (each scope's newest row stays: a model's numbering goes on from it after a restart)
            self._db.execute(
                "DELETE FROM tinker_requests WHERE created_at < ? AND seq_id < "
                "(SELECT MAX(seq_id) FROM tinker_requests AS newest WHERE newest.scope = tinker_requests.scope)",
                (horizon,),
            )

    def future_added(self, future: Future) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO futures (id, owner, kind, key, status, submitted_at, request) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (future.id, future.owner, future.kind, future.key, future.status, future.submitted_at,
                 json.dumps({k: future.meta[k] for k in ("endpoint", "request_id") if k in future.meta})),
            )

    def future_finished(self, future: Future, result: str | None = None) -> None:
        """``result``: the result already encoded as JSON (encoded here if not)."""
        if result is None and future.status == COMPLETED:
            result = json.dumps(jsonable(future.result))
        with self._lock:
            self._db.execute(
                "UPDATE futures SET status = ?, render = ?, result = ?, error = ?, error_type = ?, finished_at = ? "
                "WHERE id = ?",
                (future.status, future.meta.get("render"), result, future.error, future.error_type,
                 future.finished_at, future.id),
            )

    def load_future(self, future_id: str) -> Future | None:
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
        future = Future(id=fid, key=key, kind=kind, status=status, owner=owner, submitted_at=submitted)
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
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO idempotency (owner, key, response, created_at) VALUES (?, ?, ?, ?)",
                (owner, key, json.dumps(response), time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
