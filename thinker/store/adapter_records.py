"""The durable adapter registry: every trainable adapter, in the ``adapters`` table.

The backend keeps adapters in memory (backend/lora/adapters.py); this records each one as it is
created, trained and deleted, so that after a crash the server knows what it had:

- with AUTOSAVE_EVERY_STEPS on, each adapter comes back under its own id from its newest
  training checkpoint (weights + optimizer, at that checkpoint's step);
- otherwise it is marked lost, and a request naming it says so and points to its newest
  checkpoint, instead of a bare "not found".
"""

from __future__ import annotations

import json
import logging

from thinker.store.checkpoints import CheckpointStore, TinkerPath
from thinker.store.database import Database
from thinker.store.futures import current_owner

log = logging.getLogger("thinker.registry")

LIVE, LOST = "live", "lost"


class AdapterRecords:
    def __init__(self, database: Database, checkpoints: CheckpointStore) -> None:
        self.db = database
        self.checkpoints = checkpoints

    def attach(self, backend) -> None:
        """Record the backend's trainable adapters from now on."""
        backend.adapters.created_hooks.append(self.created)
        backend.adapters.removed_hooks.append(self.removed)
        backend.adapters.missing_message = self.missing_message
        backend.after_step_hooks.append(self.stepped)

    def created(self, adapter) -> None:
        if not adapter.trainable:
            return  # frozen sampler weights: a cache of a checkpoint or a snapshot
        config = {"rank": adapter.rank, "alpha": adapter.alpha, "target_modules": adapter.target_modules}
        # (record: on a full disk the adapter still works; only the registry's memory of it is lost)
        self.db.record(
            "INSERT OR REPLACE INTO adapters (model_id, owner, config, state, step, tokens_trained, last_loss, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (adapter.id, adapter.owner, json.dumps(config), LIVE, adapter.step, adapter.tokens_trained,
             adapter.last_loss, adapter.created_at),
            f"adapter {adapter.id}",
        )

    def stepped(self, adapter) -> None:
        self.db.record(
            "UPDATE adapters SET step = ?, tokens_trained = ?, last_loss = ? WHERE model_id = ?",
            (adapter.step, adapter.tokens_trained, adapter.last_loss, adapter.id),
            f"the step of {adapter.id}",
        )

    def removed(self, adapter) -> None:
        self.db.record("DELETE FROM adapters WHERE model_id = ?", (adapter.id,), f"the deletion of {adapter.id}")

    def newest_training_checkpoint(self, model_id: str):
        saved = [c for c in self.checkpoints.list(model_id) if c.kind == "weights" and c.has_optimizer]
        return saved[-1] if saved else None

    def recover(self, backend, restore: bool) -> tuple[int, int]:
        """After a restart: bring back (``restore``) or mark lost every adapter the last run
        had. Returns (restored, lost)."""
        rows = self.db.query("SELECT model_id, owner, step FROM adapters WHERE state = ?", (LIVE,))
        restored = 0
        for model_id, owner, step in rows:
            checkpoint = self.newest_training_checkpoint(model_id) if restore else None
            if checkpoint is None:
                self._lost(model_id)
                continue
            folder = self.checkpoints.folder(TinkerPath.parse(checkpoint.tinker_path))
            try:
                backend.restore_adapter(folder, model_id, owner, checkpoint.step)
            except Exception:  # noqa: BLE001 - one unreadable checkpoint must not stop the start
                log.exception("could not restore %s from %s", model_id, checkpoint.tinker_path)
                self._lost(model_id)
                continue
            restored += 1
            if checkpoint.step != step:
                log.warning("%s restored at step %d (it had reached %d)", model_id, checkpoint.step, step)
        return restored, len(rows) - restored

    def _lost(self, model_id: str) -> None:
        self.db.record("UPDATE adapters SET state = ? WHERE model_id = ?", (LOST, model_id), f"{model_id} as lost")

    def missing_message(self, model_id: str) -> str:
        """Why ``model_id`` is not here: lost in a restart (told only to its owner), or unknown."""
        rows = self.db.query("SELECT owner FROM adapters WHERE model_id = ? AND state = ?", (model_id, LOST))
        if rows and rows[0][0] == current_owner.get():
            checkpoint = self.newest_training_checkpoint(model_id)
            where = (
                f"; its newest checkpoint is {checkpoint.tinker_path} (step {checkpoint.step}): load it with "
                "/load_state or create_training_client_from_state" if checkpoint else "; it had no checkpoint"
            )
            return (
                f"model_id {model_id!r} was lost when the server restarted (adapter state that was not "
                f"saved does not survive a crash; see AUTOSAVE_EVERY_STEPS){where}"
            )
        return f"model_id {model_id!r} is not an adapter on this server"

