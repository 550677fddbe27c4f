"""Per-user caps on HTTP requests in flight, so no one user holds every waitress thread.

Each request holds one of the HTTP_THREADS threads until it is answered; a long-poll
(``retrieve_future``, seed and Tinker) holds it for up to MAX_LONG_POLL_S while its future
stays pending. A client with many pending futures (a Tinker SDK waiting on a seq_id gap
keeps one long-poll per future) could take every thread, and everyone else's requests
would wait in waitress's queue behind them. So each user (an API key's owner; without
keys, a client address) may have at most MAX_OPEN_REQUESTS_PER_USER requests open, of
which MAX_LONG_POLLS_PER_USER long-polls; past a cap the request is answered at once
with 429 and Retry-After, freeing its thread.
"""

from __future__ import annotations

import threading

from flask import Flask, Response, current_app, g, request

from thinker.core.config import Config
from thinker.core.errors import RateLimitError
from thinker.http.auth import OPEN_OWNER, owner

LONG_POLL_PATHS = frozenset({"/retrieve_future", "/api/v1/retrieve_future"})
RETRY_AFTER_S = 1  # a long-poll's slot frees within MAX_LONG_POLL_S, usually much sooner


class InFlight:
    """Counts of open requests per (user, kind), changed under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def enter(self, who: str, kinds: tuple[str, ...], limits: tuple[int, ...]) -> tuple[str, int] | None:
        """Count one more request of ``who`` under each of ``kinds``, unless one is at its
        limit: then count nothing and return that (kind, limit)."""
        with self._lock:
            for kind, limit in zip(kinds, limits, strict=True):
                if self._counts.get((who, kind), 0) >= limit:
                    return kind, limit
            for kind in kinds:
                self._counts[(who, kind)] = self._counts.get((who, kind), 0) + 1
            return None

    def leave(self, who: str, kinds: tuple[str, ...]) -> None:
        with self._lock:
            for kind in kinds:
                left = self._counts[(who, kind)] - 1
                if left:
                    self._counts[(who, kind)] = left
                else:
                    del self._counts[(who, kind)]


_NAMES = {"open": "MAX_OPEN_REQUESTS_PER_USER", "long_poll": "MAX_LONG_POLLS_PER_USER"}
_WHAT = {"open": "requests open", "long_poll": "retrieve_future long-polls open"}


def install(app: Flask, config: Config) -> InFlight:
    """Cap each user's requests in flight (registered after auth.install: it needs the owner)."""
    in_flight = InFlight()
    app.extensions["thinker_in_flight"] = in_flight

    @app.before_request
    def admit():
        who = owner()
        if who is None or who == OPEN_OWNER:  # public paths, or no keys: per client address
            who = f"client {request.remote_addr}"
        kinds: tuple[str, ...] = ("open", "long_poll") if request.path in LONG_POLL_PATHS else ("open",)
        limits = tuple(
            config.max_long_polls_per_user if kind == "long_poll" else config.max_open_requests_per_user
            for kind in kinds
        )
        refused = in_flight.enter(who, kinds, limits)
        if refused is not None:
            kind, limit = refused
            raise RateLimitError(
                f"you have {limit} {_WHAT[kind]} (the limit per user, {_NAMES[kind]}, is {limit}); "
                "retry when one has been answered",
                retry_after_s=RETRY_AFTER_S,
            )
        g.in_flight = (who, kinds)

    @app.teardown_request
    def release(_exc=None):
        counted = g.pop("in_flight", None)
        if counted is not None:
            in_flight.leave(*counted)

    return in_flight


def keep_open_until_closed(response: Response) -> None:
    """Count a streamed response as open until it is closed (its last event sent, or its client
    gone), not only until its view returns: a stream holds its HTTP thread all that time."""
    counted = g.pop("in_flight", None)
    if counted is not None:
        in_flight: InFlight = current_app.extensions["thinker_in_flight"]
        response.call_on_close(lambda: in_flight.leave(*counted))
