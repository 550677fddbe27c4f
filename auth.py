"""API keys and who owns what.

With keys configured (``THINKER_API_KEYS`` and/or ``THINKER_API_KEYS_FILE``), every request
but the public ones must carry a valid key, as ``X-API-Key`` (what the Tinker SDK sends) or
``Authorization: Bearer <key>``; anything else is a 401. Keys are kept only as SHA-256
digests and compared in constant time. A key's owner id is derived from its digest, so it
is stable across restarts and reveals nothing about the key. Every adapter, future,
checkpoint and sampling session records its owner; another owner is answered as if it did
not exist (404). Without keys the server runs in open single-user mode: one owner, "local".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from flask import Flask, g, request

from config import Config
from errors import AuthenticationError, ConfigurationError, NotFoundError
from futures import current_owner

log = logging.getLogger("thinker.auth")

OPEN_OWNER = "local"
# Paths anyone may call: health and metrics, the dashboard's page and assets (its data needs
# a key), and the signed (self-authenticating) downloads.
PUBLIC_PATHS = ("/", "/healthz", "/metrics", "/api/v1/healthz", "/openapi.json")
PUBLIC_PREFIXES = ("/api/v1/files/", "/dashboard/assets/")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    @classmethod
    def from_config(cls, config: Config) -> KeyRing:
        keys = [k.strip() for k in (config.thinker_api_keys or "").split(",") if k.strip()]
        if config.thinker_api_keys_file:
            try:
                lines = Path(config.thinker_api_keys_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigurationError(f"THINKER_API_KEYS_FILE cannot be read: {exc}") from None
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        short = [k for k in keys if len(k) < 8]
        if short:
            raise ConfigurationError("API keys must be at least 8 characters long")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner_of(self, key: str | None) -> str | None:
        """The owner id of a valid key, else None. Every stored digest is compared, so the
        time taken says nothing about which (or whether a) key matched."""
        if key is None:
            return None
        digest, found = _digest(key), None
        for stored in self._digests:
            if hmac.compare_digest(digest, stored):
                found = stored
        return None if found is None else "user-" + hashlib.sha256(b"owner:" + found).hexdigest()[:16]


def presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def install(app: Flask, keys: KeyRing) -> None:
    """Authenticate every request before its route runs, and tag what it creates."""
    if keys.enabled:
        log.info("API keys: on (%d keys); every request needs X-API-Key or Authorization: Bearer", len(keys._digests))
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
