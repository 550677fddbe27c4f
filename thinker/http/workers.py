"""EXECUTOR=ray at the edge: the admin routes that list, add and drain model workers, and the
glue between the cluster's fault recovery (backend/cluster/recovery.py) and the durable
adapter registry (thinker/store/adapter_records.py), which the backend may not import.

``GET /admin/workers``: each worker (state, device, adapters placed, calls in flight) and the
cluster's recent events. ``POST /admin/workers``: start one more worker; new adapters go to it.
``POST /admin/workers/<name>/drain``: stop placing on it, move each of its adapters away in
that adapter's turn (a job keyed by its id, so no request of it runs during the move), then
stop it. ``POST /admin/workers/rebalance``: move adapters (the same way) until every worker
that is up holds within one adapter of the others. All need an admin key (ADMIN_API_KEYS), or
open single-user mode.
"""

from __future__ import annotations

import hmac
import logging
import time

from flask import Blueprint, Flask

from thinker.core.errors import AuthenticationError
from thinker.http.auth import OPEN_OWNER, owner, presented_key
from thinker.http.services import services
from thinker.store.adapter_records import AdapterRecords
from thinker.store.checkpoints import TinkerPath

bp = Blueprint("workers", __name__)
log = logging.getLogger("thinker.cluster")

DRAIN_MOVE_TIMEOUT_S = 600.0  # one adapter's move waits at most this long for its turn


def install(app: Flask, records: AdapterRecords, restore: bool) -> None:
    """Wire recovery to the registry and register the admin routes."""
    backend = app.extensions["thinker"].backend
    recovery = backend.recovery

    def newest(adapter_id: str):
        checkpoint = records.newest_training_checkpoint(adapter_id) if restore else None
        if checkpoint is None:
            return None
        return records.checkpoints.folder(TinkerPath.parse(checkpoint.tinker_path)), checkpoint.step

    recovery.newest = newest
    recovery.mark_lost = records._lost  # the same "lost" state a restart leaves
    registry_message = backend.adapters.missing_message

    def missing_message(adapter_id: str) -> str:
        message = registry_message(adapter_id)  # told only to its owner, naming the newest checkpoint
        why = recovery.lost_why.get(adapter_id)
        return message.replace("when the server restarted", f"when {why}") if why else message

    backend.adapters.missing_message = missing_message
    app.register_blueprint(bp)


def _require_admin() -> None:
    keys = [k.strip() for k in (services().config.admin_api_keys or "").split(",") if k.strip()]
    key = presented_key()
    if keys and key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        return
    if not keys and owner() == OPEN_OWNER:
        return  # open single-user mode: whoever reaches the port runs the server anyway
    raise AuthenticationError("an admin key (ADMIN_API_KEYS) is required to manage workers")


@bp.get("/admin/workers")
def list_workers():
    _require_admin()
    backend = services().backend
    events = [{"time": t, "event": text} for t, text in backend.recovery.events]
    placements = backend.placements()
    workers = [{**row, "adapter_ids": placements.get(row["name"], [])} for row in backend.worker_stats()]
    return {"workers": workers, "events": events}


@bp.post("/admin/workers")
def add_worker():
    _require_admin()
    return {"worker": services().backend.add_worker()}


def _move_all(moves: list[tuple[str, str, str | None]]) -> tuple[dict, dict]:
    """Move each (adapter, from, to or None) in that adapter's turn; (moved, failed)."""
    s = services()
    recovery = s.backend.recovery

    def move(adapter_id: str, source: str, target: str | None):
        return lambda: {"worker": recovery.move(adapter_id, source, target)}

    futures = {a: s.pool.submit(a, "move", move(a, src, dst)) for a, src, dst in moves}
    moved, failed = {}, {}
    for adapter_id, future in futures.items():
        future.wait(DRAIN_MOVE_TIMEOUT_S)
        if future.status == "completed":
            moved[adapter_id] = future.result["worker"]
        else:
            failed[adapter_id] = future.error or "still waiting for its turn"
    return moved, failed


@bp.post("/admin/workers/<name>/drain")
def drain_worker(name: str):
    _require_admin()
    recovery = services().backend.recovery
    started = time.time()
    moved, failed = _move_all([(adapter_id, name, None) for adapter_id in recovery.drain_start(name)])
    if failed:  # the worker keeps what could not move, and stays up (draining: nothing new lands on it)
        log.error("drain of %s: %d adapters could not move: %s", name, len(failed), failed)
        return {"worker": name, "drained": False, "moved": moved, "failed": failed}, 500
    recovery.drain_finish(name)
    log.info("worker %s drained in %.1f s: %d adapters moved", name, time.time() - started, len(moved))
    return {"worker": name, "drained": True, "moved": moved}


@bp.post("/admin/workers/rebalance")
def rebalance():
    """Even out the adapters over the workers that are up (after adding workers, say)."""
    _require_admin()
    plan = services().backend.placement.rebalance_plan()
    moved, failed = _move_all(plan)
    return {"moved": moved, "failed": failed}, 500 if failed else 200
