"""API keys and who owns what.

With keys configured (``THINKER_API_KEYS`` and/or ``THINKER_API_KEYS_FILE``), every request
but the public ones must carry a valid key, as ``X-API-Key`` (what the Tinker SDK sends) or
``Authorization: Bearer <key>``; anything else is a 401. Keys are kept only as SHA-256
digests, in the SQLite database (thinker.keys makes and revokes keys while the server runs), and
compared in constant time.
A key's owner id is derived from its digest, so it is stable across restarts and reveals
nothing about the key. Every adapter, future, checkpoint and sampling session records its
owner; another owner is answered as if it did not exist (404). Without keys the server
runs in open single-user mode: one owner, "local".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from pathlib import Path

from flask import Flask, g, request

from thinker.core.config import Config
from thinker.core.errors import AuthenticationError, ConfigurationError, NotFoundError
from thinker.store.database import Database
from thinker.store.futures import current_owner

log = logging.getLogger("thinker.auth")

OPEN_OWNER = "local"
# Paths anyone may call: health and metrics, the dashboard's page and assets (its data needs
# a key), and the signed (self-authenticating) downloads.
PUBLIC_PATHS = ("/", "/healthz", "/metrics", "/api/v1/healthz", "/openapi.json")
PUBLIC_PREFIXES = ("/api/v1/files/", "/dashboard/assets/")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_id(key_digest: str) -> str:
    """The owner id of a key: derived from its digest, so stable across restarts and
    revealing nothing about the key."""
    return "user-" + hashlib.sha256(b"owner:" + bytes.fromhex(key_digest)).hexdigest()[:16]


def config_keys(config: Config) -> list[str]:
    """The keys named by THINKER_API_KEYS and THINKER_API_KEYS_FILE."""
    keys = [k.strip() for k in (config.thinker_api_keys or "").split(",") if k.strip()]
    if config.thinker_api_keys_file:
        try:
            lines = Path(config.thinker_api_keys_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"THINKER_API_KEYS_FILE cannot be read: {exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    check_keys(keys)
    return keys


def check_keys(keys: list[str]) -> None:
    if any(len(k) < 8 for k in keys):
        raise ConfigurationError("API keys must be at least 8 characters long")


class KeyRing:
    """The API keys, as SHA-256 digests in the ``api_keys`` table: those from the config
    (re-synced at each start, so a key removed from THINKER_API_KEYS stops working) and
    those made with ``python -m thinker.keys create`` (kept until revoked)."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self._digests: dict[bytes, str] = {}  # digest -> owner id
        self._version: int | None = None
        self._lock = threading.Lock()
        # Fixed at start: a first key made while the server runs open takes effect at the
        # next start, rather than locking "local" out of its own adapters mid-run.
        self.enabled = self.count() > 0

    @classmethod
    def from_config(cls, config: Config, database: Database) -> KeyRing:
        sync_config_keys(database, config_keys(config))
        return cls(database)

    def count(self) -> int:
        return self.db.query("SELECT COUNT(*) FROM api_keys")[0][0]

    def owner_of(self, key: str | None) -> str | None:
        """The owner id of a valid key, else None. Every stored digest is compared in constant
        time, so the time taken says nothing about which (or whether a) key matched."""
        if key is None:
            return None
        wanted, found = bytes.fromhex(digest(key)), None
        for stored, owner in self._current().items():
            if hmac.compare_digest(wanted, stored):
                found = owner
        return found

    def _current(self) -> dict[bytes, str]:
        """The stored digests, re-read when another connection (thinker.keys) changed the database:
        SQLite's data_version says so at the cost of one pragma."""
        version = self.db.query("PRAGMA data_version")[0][0]
        with self._lock:
            if version != self._version:
                rows = self.db.query("SELECT digest, owner FROM api_keys")
                self._digests = {bytes.fromhex(d): owner for d, owner in rows}
                self._version = version
            return self._digests


def sync_config_keys(database: Database, keys: list[str]) -> None:
    digests = {digest(k) for k in keys}
    for (stored,) in database.query("SELECT digest FROM api_keys WHERE source = 'config'"):
        if stored not in digests:
            database.execute("DELETE FROM api_keys WHERE digest = ?", (stored,))
    for d in digests:
        database.execute(
            "INSERT OR IGNORE INTO api_keys (digest, owner, label, source, created_at) "
            "VALUES (?, ?, NULL, 'config', ?)",
            (d, owner_id(d), time.time()),
        )


def presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def install(app: Flask, keys: KeyRing) -> None:
    """Authenticate every request before its route runs, and tag what it creates."""
    if keys.enabled:
        log.info("API keys: on (%d keys); every request needs X-API-Key or Authorization: Bearer", keys.count())
    else:
        log.warning("API keys: none configured: OPEN single-user mode, anyone who can reach the port can use it")

    @app.before_request
    def authenticate():
        if not keys.enabled:
            owner = OPEN_OWNER
        elif request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            owner = None
        else:
            owner = keys.owner_of(presented_key())
            if owner is None:
                raise AuthenticationError("a valid API key is required (X-API-Key or Authorization: Bearer)")
        g.owner = owner
        g.owner_token = current_owner.set(owner)

    @app.teardown_request
    def forget(_exc=None):
        token = g.pop("owner_token", None)
        if token is not None:
            current_owner.reset(token)


def owner() -> str | None:
    """Who is calling (None on public paths)."""
    return g.get("owner")


def check_owner(thing_owner: str | None, not_found_message: str) -> None:
    """404 for anything the caller does not own, worded exactly as for what does not exist
    (pass that message), so the answer gives no hint that it exists."""
    if thing_owner != owner():
        raise NotFoundError(not_found_message)
