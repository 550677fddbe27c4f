"""The live dashboard: GET / (the page), GET /dashboard/assets/<name> (its JS, CSS and icon,
shipped in ``dashboard_assets/``: no CDN, no framework) and GET /dashboard/state (the JSON the
page polls).

The page is public; its data is not. With API keys on, /dashboard/state needs a key and shows
only that key's adapters, requests and queue, plus server-wide figures that reveal nothing
about anyone's work (base model, device, workers, total queue, throughput). ``Activity`` keeps
the recent requests and the last minute's throughput, fed by the pool's on_finish hook.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from pathlib import Path

from flask import Blueprint, current_app, request, send_from_directory
from flask.blueprints import BlueprintSetupState

from backend.lora.adapters import Adapter
from thinker.core.errors import BadRequestError, NotFoundError
from thinker.http import auth
from thinker.store.futures import COMPLETED, FutureRecord

bp = Blueprint("dashboard", __name__)

ASSETS_DIR = Path(__file__).resolve().parent / "dashboard_assets"
# Only files of the folder with these suffixes are served (``<name>`` holds no "/", so nothing
# outside it), each with this type rather than whatever the platform's mimetypes guesses.
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The page loads only its own script and style: an adapter id or error text rendered into it
# can never run as code.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

DEFAULT_ADAPTERS = 50  # rows per state: the most recently active first, the rest only counted
MAX_ADAPTERS = 200
MAX_POINTS = 300  # loss points per adapter per answer (the page keeps as many)
RECENT_KEPT = 1000  # finished requests remembered, all owners together
RECENT_SENT = 25  # of which the caller's newest are sent
WINDOW_S = 60  # throughput is measured over this trailing window


class Activity:
    """Recent finished requests and per-second throughput buckets, fed by ``record`` from
    ``WorkerPool.on_finish``. That runs on the finishing worker's thread, so ``record`` only appends;
    readers copy under this object's own lock and do the rest outside it."""

    def __init__(self, window_s: int = WINDOW_S, kept: int = RECENT_KEPT) -> None:
        self.window_s = window_s
        self.started_at = time.time()
        self._recent: deque[dict] = deque(maxlen=kept)
        # [second, requests, trained tokens] per second that saw a finish, oldest first
        self._buckets: deque[list[int]] = deque()
        self._lock = threading.Lock()

    def record(self, future: FutureRecord) -> None:
        finished = future.finished_at or time.time()
        tokens = 0
        if future.kind == "fwdbwd" and future.status == COMPLETED and isinstance(future.result, dict):
            tokens = int(future.result.get("num_tokens") or 0)
        entry = {
            "id": future.id,
            "kind": future.kind,
            "key": future.key,
            "owner": future.owner,
            "status": future.status,
            "submitted_at": future.submitted_at,
            "started_at": future.started_at,
            "finished_at": finished,
            "error_type": future.error_type,
        }
        second = int(finished)
        with self._lock:
            self._recent.append(entry)
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += 1
                self._buckets[-1][2] += tokens
            else:
                self._buckets.append([second, 1, tokens])
            while self._buckets and self._buckets[0][0] <= second - self.window_s:
                self._buckets.popleft()

    def recent(self, visible, limit: int = RECENT_SENT) -> list[dict]:
        """The newest ``limit`` finished requests that ``visible(owner)`` allows, newest first."""
        with self._lock:
            entries = list(self._recent)
        out = []
        for e in reversed(entries):
            if not visible(e["owner"]):
                continue
            waited = (e["started_at"] or e["finished_at"]) - e["submitted_at"]
            out.append({
                "id": e["id"],
                "kind": e["kind"],
                "model_id": None if (e["key"] or "solo_").startswith("solo_") else e["key"],
                "status": e["status"],
                "finished_at": round(e["finished_at"], 3),
                "latency_ms": round(1000 * (e["finished_at"] - e["submitted_at"]), 1),
                "queued_ms": round(1000 * max(0.0, waited), 1),
                "error_type": e["error_type"],
            })
            if len(out) == limit:
                break
        return out

    def throughput(self, now: float | None = None) -> dict:
        """Requests/s and trained tokens/s over the trailing window (or since start, when the
        server is younger than that), and the per-second series for the chart."""
        now = time.time() if now is None else now
        first = int(now) - self.window_s + 1
        with self._lock:
            buckets = [list(b) for b in self._buckets if b[0] >= first]
        span = max(1.0, min(float(self.window_s), now - self.started_at))
        return {
            "window_s": self.window_s,
            "requests_per_s": round(sum(b[1] for b in buckets) / span, 3),
            "tokens_per_s": round(sum(b[2] for b in buckets) / span, 1),
            "series": buckets,  # [second, requests, tokens]; missing seconds saw nothing
        }


@bp.record_once
def _attach(state: BlueprintSetupState) -> None:
    activity = Activity()
    state.app.extensions["thinker.dashboard"] = activity
    state.app.extensions["thinker"].pool.on_finish(activity.record)


def _asset(name: str):
    response = send_from_directory(ASSETS_DIR, name, max_age=0)
    response.headers.update(PAGE_HEADERS)
    return response


@bp.get("/")
def page():
    response = _asset("index.html")
    response.mimetype = "text/html"
    return response


@bp.get("/dashboard/assets/<name>")
def asset(name: str):
    suffix = Path(name).suffix
    if suffix not in ASSET_TYPES or name.startswith(".") or not (ASSETS_DIR / name).is_file():
        raise NotFoundError(f"no dashboard asset named {name!r}")
    response = _asset(name)
    response.mimetype = ASSET_TYPES[suffix]
    return response


def _float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequestError(f"{name}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequestError(f"{name}: must be a finite number >= 0 (seconds since the epoch)")
    return value


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name}: {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise BadRequestError(f"{name}: {value} is out of range; allowed {low}..{high}")
    return value


def _last_active(adapter: Adapter) -> float:
    return max(adapter.created_at, adapter.last_used_at)


def _points(adapter: Adapter, since: float | None) -> tuple[list[list], int]:
    """The newest loss points after ``since`` (at most MAX_POINTS), oldest first, and how
    many retained points were left out (the page reloads in full when it lacks them)."""
    history = list(adapter.loss_history)  # a copy: a training pass may append meanwhile
    start = len(history) - MAX_POINTS
    if since is not None:  # times only grow, so the new points are a tail
        start = max(start, bisect.bisect_right(history, since, key=lambda point: point[0]))
    picked = [[round(t, 3), step, _num(loss)] for t, step, loss in history[max(0, start):]]
    return picked, len(history) - len(picked)


def _num(value: float | None) -> float | None:
    """JSON has no NaN or infinity; a lost loss shows as a gap."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


def _describe(adapter: Adapter, since: float | None) -> dict:
    points, left_out = _points(adapter, since)
    return {
        "model_id": adapter.id,
        "owner": adapter.owner,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "trainable": adapter.trainable,
        "step": adapter.step,
        "tokens_trained": adapter.tokens_trained,
        "last_loss": _num(adapter.last_loss),
        "created_at": round(adapter.created_at, 3),
        "last_active": round(_last_active(adapter), 3),
        "points": points,  # [time, step, loss] of each training forward-backward
        "points_left_out": left_out,
    }


@bp.get("/dashboard/state")
def state():
    s = current_app.extensions["thinker"]
    activity: Activity = current_app.extensions["thinker.dashboard"]
    since = _float_arg("since")
    limit = _int_arg("limit", DEFAULT_ADAPTERS, 1, MAX_ADAPTERS)
    me = auth.owner()
    keys_on = me != auth.OPEN_OWNER

    # Open mode has a single user: everything is theirs (adapters made by internal jobs included).
    def visible(thing_owner: str | None) -> bool:
        return not keys_on or thing_owner == me

    now = time.time()
    mine = [a for a in s.backend.adapters.all() if visible(a.owner)]
    mine.sort(key=_last_active, reverse=True)
    pending = s.pool.pending_by_owner()
    info = s.backend.info()
    sampler = s.backend.sampler.stats() if s.backend.sampler else {}
    return {
        "server_time": round(now, 3),
        "keys": keys_on,
        "owner": me,
        "server": {
            "base_model": info["base_model"],
            "device": info["device"],
            "dtype": info["dtype"],
            "context_length": info["context_length"],
            "backend": s.backend.name,
            "uptime_s": round(now - activity.started_at, 1),
            "adapters_loaded": info["adapters"],  # all users' (a count reveals no one's work)
            "adapters_resident": info["adapters_resident"],  # of which on the accelerator
            # workers, busy_workers (threads running a job: at most workers), queued, running (adapters
            # with a job running: a fused pass counts each), batching, fused passes and jobs
            **s.pool.stats(),
            **sampler,
        },
        "queue": {
            "yours": sum(n for o, n in pending.items() if visible(o)),
            "total": sum(pending.values()),
        },
        "throughput": activity.throughput(now),
        "adapters": [_describe(a, since) for a in mine[:limit]],
        "adapters_total": len(mine),
        "recent_requests": activity.recent(visible),
        "workers": info.get("model_workers", []),  # EXECUTOR=ray: device, adapters placed, queue, busy
    }
