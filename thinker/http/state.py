"""Seed-API routes for durable adapter state: checkpoints (save, list, load) and deletion.

``POST /save_state {"model_id", "name"}`` -> future -> ``{"path": "tinker://<model_id>/weights/<name>"}``
(weights and optimizer state, in PEFT format); ``POST /load_state {"path"}`` -> future ->
``{"model_id"}``, a new adapter with those weights and optimizer state; ``GET /checkpoints``;
``POST /delete_lora {"model_id"}``. Checkpoints are shared with the Tinker API: a path saved
here loads with the SDK and vice versa.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flask import Blueprint

from thinker.core.errors import BadRequestError, ConflictError, InsufficientStorageError, StorageQuotaError
from thinker.core.paths import check_name
from thinker.http.auth import owner
from thinker.http.schemas import LoadStateBody, ModelIdBody, SaveStateBody
from thinker.http.services import body, check_adapter_quota, checkpoint_bytes, owned_checkpoint, owned_model, services
from thinker.store.checkpoints import CheckpointInfo, TinkerPath

bp = Blueprint("state", __name__)
log = logging.getLogger("thinker.state")


def write_checkpoint(
    s, model_id: str, kind: str, name: str, optimizer: bool, *, ttl_s: int | None = None,
    user_metadata: dict | None = None, overwrite: bool = False, finish: Callable[[Path], None] | None = None,
) -> TinkerPath:
    """Write a checkpoint of the adapter's current state. Runs as a job, in the adapter's
    turn, so it holds exactly the updates submitted before it. ``finish(folder)`` runs on the
    written files before they become the checkpoint (an export encrypts them)."""
    path = TinkerPath(model_id, kind, check_name(name, "name"))
    adapter = s.backend.adapters.get(model_id)
    if s.checkpoints.exists(path) and s.checkpoints.get(path).owner != adapter.owner:
        raise ConflictError(f"checkpoint {path} belongs to another owner")  # a run id reused after a restart
    if s.checkpoints.exists(path) and not overwrite:
        raise ConflictError(f"checkpoint {path} already exists; choose another name")
    info = CheckpointInfo(
        tinker_path=str(path),
        run_id=model_id,
        kind=kind,
        name=path.name,
        base_model=s.backend.loaded.name,
        rank=adapter.rank,
        alpha=adapter.alpha,
        target_modules=list(adapter.target_modules),
        step=adapter.step,
        has_optimizer=optimizer,
        user_metadata=dict(user_metadata or {}),
        expires_at=time.time() + ttl_s if ttl_s else None,
        owner=adapter.owner,
    )
    # Written aside and swapped in when complete: an overwritten checkpoint stays until then.
    def write(folder: Path) -> None:
        s.backend.save_state(model_id, folder, optimizer)
        if finish is not None:
            finish(folder)

    s.checkpoints.save(info, write, checkpoint_bytes(adapter, optimizer))
    return path



@bp.post("/save_state")
def save_state():
    s, req = services(), body(SaveStateBody)
    adapter_id = owned_model(req.model_id, allow_base=False)
    adapter = s.backend.adapters.get(adapter_id)
    name = req.name or f"step-{adapter.step:06d}"
    path = TinkerPath(adapter_id, "weights", check_name(name, "name"))
    # Over quota (403) or a full disk (507): said now, not after queueing (the job checks again).
    s.checkpoints.check_room(adapter.owner, checkpoint_bytes(adapter, True), path)

    def save() -> dict:
        return {"path": str(write_checkpoint(s, adapter_id, "weights", name, True)), "model_id": adapter_id}

    future = s.pool.submit(adapter_id, "save_state", save)
    return {"request_id": future.id, "model_id": adapter_id}


@bp.post("/load_state")
def load_state():
    s, req = services(), body(LoadStateBody)
    path = TinkerPath.parse(req.path)
    info = owned_checkpoint(path)
    if not info.has_optimizer:
        raise BadRequestError(f"path: {path} holds weights only (saved for sampling); load a weights/ checkpoint")
    check_adapter_quota()
    who = owner()

    def load() -> dict:
        adapter = s.backend.create_from_checkpoint(
            s.checkpoints.folder(path), None, optimizer=True, trainable=True, owner=who
        )
        return {"model_id": adapter["model_id"], "path": str(path), "step": info.step}

    future = s.pool.submit(None, "load_state", load)
    return {"request_id": future.id, "model_id": None}


@bp.get("/checkpoints")
def list_checkpoints():
    mine = [c for c in services().checkpoints.list() if c.owner == owner()]
    return {"checkpoints": [{**c.describe(), "model_id": c.run_id, "step": c.step} for c in mine]}


@bp.post("/delete_lora")
def delete_lora():
    """Remove an adapter after the jobs queued before it (its checkpoints stay; its /save_lora
    export goes: it was a copy of the adapter's weights, and this frees its quota)."""
    s, req = services(), body(ModelIdBody)
    adapter_id = owned_model(req.model_id, allow_base=False)

    def delete() -> dict:
        folder = s.backend.export_folder(adapter_id).parent
        s.backend.remove_adapter(adapter_id)
        s.checkpoints.delete_exports(folder)
        return {"model_id": adapter_id, "deleted": True}

    future = s.pool.submit(adapter_id, "delete_lora", delete)
    return {"request_id": future.id, "model_id": adapter_id}


AUTOSAVES_KEPT = 3


class Autosaver:
    """After every ``every_steps``-th optimizer step of a trainable adapter, checkpoint it
    (weights + optimizer) as ``autosave-<step>``; the 3 newest autosaves of each are kept.
    ``flush()`` (at SIGTERM) saves every adapter that stepped since its last autosave, so a
    planned restart loses nothing: the adapters come back at the step they had reached."""

    def __init__(self, s, every_steps: int) -> None:
        self.s = s
        self.every_steps = every_steps
        # adapter id -> step of its newest autosave; adapters restored at start are saved as they are
        self._saved_step = {a.id: a.step for a in s.backend.adapters.all() if a.trainable}

    def after_step(self, adapter) -> None:
        if adapter.trainable and adapter.step % self.every_steps == 0:
            self._save(adapter)

    def flush(self) -> int:
        """Autosave every trainable adapter not saved at its current step; how many."""
        stale = [
            a for a in self.s.backend.adapters.all()
            if a.trainable and a.step > 0 and self._saved_step.get(a.id) != a.step
        ]
        for adapter in stale:
            self._save(adapter)
        return len(stale)

    def _save(self, adapter) -> None:
        try:
            path = write_checkpoint(
                self.s, adapter.id, "weights", f"autosave-{adapter.step:06d}", True, overwrite=True
            )
        except (InsufficientStorageError, StorageQuotaError) as exc:  # the step itself went well
            log.warning("autosave of %s at step %d skipped: %s", adapter.id, adapter.step, exc.message)
            return
        mine = self.s.checkpoints.list(adapter.id)
        autosaves = [c for c in mine if c.kind == "weights" and c.name.startswith("autosave-")]
        for old in autosaves[:-AUTOSAVES_KEPT]:
            self.s.checkpoints.delete(TinkerPath.parse(old.tinker_path))
        self._saved_step[adapter.id] = adapter.step
        log.info("autosaved %s at step %d: %s", adapter.id, adapter.step, path)
