"""Idempotency-Key claims: at most one request per (owner, key) runs at a time.

Replaying a stored answer and storing a new one are two steps (``install_idempotency``);
without a claim between them, duplicates sent at once would all find no answer and all
run. A request claims its key before it looks for an earlier answer and keeps the claim
until its own answer is stored: a duplicate that arrives meanwhile waits for that answer
(up to ``wait_s``), and then replays it, or is told 409 that the first is still in
progress. The claims live in this process; the stored answers (database.py) outlive it.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, g, jsonify, request

from thinker.core.errors import ConflictError
from thinker.http.auth import owner

WAIT_S = 30.0  # how long a duplicate waits for the first request's answer before a 409


class Claims:
    def __init__(self, wait_s: float = WAIT_S) -> None:
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._held: dict[tuple[str | None, str], threading.Event] = {}  # released -> set

    def acquire(self, owner: str | None, key: str) -> None:
        """Claim ``key`` for ``owner``, waiting for the request that holds it to finish;
        ConflictError (409) if it still holds it after ``wait_s``."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with self._lock:
                released = self._held.get((owner, key))
                if released is None:
                    self._held[(owner, key)] = threading.Event()
                    return
            if not released.wait(max(0.0, deadline - time.monotonic())):
                raise ConflictError(
                    f"Idempotency-Key {key!r}: a request with this key is still in progress; "
                    "retry shortly to get its answer"
                )

    def release(self, owner: str | None, key: str) -> None:
        with self._lock:
            released = self._held.pop((owner, key), None)
        if released is not None:
            released.set()

    def __len__(self) -> int:
        return len(self._held)


def install_idempotency(app: Flask) -> None:
    """A POST that carries an ``Idempotency-Key`` header and was answered before (by the same
    owner, even before a restart) gets that first answer again and runs nothing. Duplicates
    sent at the same time run once too: each claims the key first (idempotency.py), so the
    later ones wait for the first's answer."""
    claims = Claims()
    app.extensions["thinker_idempotency"] = claims

    @app.before_request
    def replay():
        key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and key:
            who = owner()
            claims.acquire(who, key)  # 409 if a duplicate still runs after Claims.wait_s
            g.idempotency_claim = (who, key)
            earlier = app.extensions["thinker"].database.idempotent_response(who, key)
            if earlier is not None:
                return jsonify(earlier)
        return None

    @app.after_request
    def remember(response):
        key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and key and response.status_code == 200 and response.is_json:
            data = response.get_json(silent=True)
            if isinstance(data, dict) and "request_id" in data:
                app.extensions["thinker"].database.remember_response(owner(), key, data)
        return response

    @app.teardown_request
    def release(_exc):  # after remember(): a waiting duplicate then finds the answer stored
        claim = g.pop("idempotency_claim", None)
        if claim is not None:
            claims.release(*claim)
