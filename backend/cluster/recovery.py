"""Worker faults, rejoining, moves and sampler replicas: what changes the placement table.

When a worker dies (its process killed, its machine gone) the first call that hits it, or the
health check (every HEALTH_EVERY_S), takes it out: every adapter it held is restored on the
other workers from its newest autosave when autosave is on, else marked lost, and a request
naming it then says so and names its newest checkpoint: the semantics of a server restart.
The calls that were running on it fail with WorkerLostError and never hang. Ray restarts
the actor (max_restarts); the health check sees the new incarnation answer and lets it rejoin,
empty, taking new adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from backend.cluster.placement import DOWN, DRAINING, UP
from thinker.core.errors import RequestFailedError

log = logging.getLogger("thinker.cluster")

HEALTH_EVERY_S = 1.0  # how often each worker is pinged
REPLICATE_WHEN_BUSY = 2  # sampler weights get a replica when each copy has this many calls in flight


class WorkerLostError(RequestFailedError):
    """The worker running this request died; the request did not complete."""

    def __init__(self, worker: str, method: str) -> None:
        super().__init__(
            f"worker lost: model worker {worker} stopped while running this request ({method}); it did not "
            "complete. The worker's adapters are restored on the other workers from their newest autosave "
            "(AUTOSAVE_EVERY_STEPS) or reported lost; submit the request again"
        )


class Recovery:
    def __init__(self, backend) -> None:
        self.backend = backend
        # Held while the placement changes for a lost worker: a job looking up its adapter's
        # home waits for the restore instead of seeing it missing.
        self.lock = threading.RLock()
        self.sources: dict[str, Path] = {}  # frozen adapter id -> the checkpoint folder it was loaded from
        # Set by the server (thinker/http/workers.py), which owns the durable registry:
        # the newest training checkpoint of an adapter as (folder, step), and marking one lost.
        self.newest: Callable[[str], tuple[Path, int] | None] = lambda adapter_id: None
        self.mark_lost: Callable[[str], None] = lambda adapter_id: None
        self.lost_why: dict[str, str] = {}  # adapter id -> which worker died with it
        self.events: deque = deque(maxlen=200)  # (time, text): the dashboard's cluster log
        self._replicating: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="thinker-cluster-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def note(self, text: str) -> None:
        self.events.append((time.time(), text))

    # ---- faults -------------------------------------------------------------------------------

    def worker_failed(self, name: str, incarnation: str, why: str) -> None:
        """Take a dead worker out (once per incarnation) and re-home or lose its adapters."""
        b = self.backend
        with self.lock:
            if name not in b.worker_names():
                return  # drained and stopped: nothing was left on it
            if b.handle(name).incarnation != incarnation or b.placement.state(name) == DOWN:
                return  # another thread saw it first
            b.placement.set_state(name, DOWN)
            held = b.placement.evict(name)
            restored, lost = self._rehome(name, held, why)
        log.error("worker %s died (%s): %d adapters restored on other workers, %d lost", name, why, restored, lost)
        self.note(f"worker {name} died: {restored} adapters restored elsewhere, {lost} lost")

    def _rehome(self, name: str, held: list[str], why: str) -> tuple[int, int]:
        b, restored, lost = self.backend, 0, 0
        for adapter_id in held:
            adapter = b.adapters.find(adapter_id)
            if adapter is None or b.placement.homes(adapter_id):
                continue  # deleted meanwhile, or a sampler replica that lives on elsewhere
            if not adapter.trainable:
                # Sampler weights: a checkpoint's are reloaded when next asked for (the Tinker
                # sampler reloads what is not loaded); an in-memory snapshot is gone, as in a restart.
                b.adapters.drop(adapter_id)
                continue
            found = self.newest(adapter_id)
            if found is not None:
                folder, step = found
                try:
                    worker = b.placement.choose(group=adapter.owner)
                    b._invoke(worker, "restore_adapter", folder, adapter_id, adapter.owner, step)
                    b.placement.place(adapter_id, worker)
                    adapter.step = step
                    restored += 1
                    continue
                except Exception:  # noqa: BLE001 - it is then lost, as after a restart
                    log.exception("could not restore %s on another worker", adapter_id)
            b.adapters.drop(adapter_id)
            self.lost_why[adapter_id] = f"its model worker {name} died ({why})" if why else f"its worker {name} died"
            self.mark_lost(adapter_id)
            lost += 1
        return restored, lost

    def _watch(self) -> None:
        """Ping every worker: a dead one is taken out, a restarted one rejoins."""
        while not self._stop.wait(HEALTH_EVERY_S):
            for name in self.backend.worker_names():
                try:
                    self._check(name)
                except Exception:  # noqa: BLE001 - (a worker removed meanwhile) the watch goes on
                    if name in self.backend.worker_names():
                        log.exception("health check of worker %s failed", name)

    def _check(self, name: str) -> None:
        from ray.exceptions import GetTimeoutError

        b = self.backend
        handle = b.handle(name)
        try:
            info = b.workers.ray.get(handle.actor.ready.remote(), timeout=10)
        except GetTimeoutError:
            return  # busy or restarting: asked again next round
        except Exception as exc:  # noqa: BLE001 - dead
            if b.placement.state(name) != DOWN:
                self.worker_failed(name, handle.incarnation, type(exc).__name__)
            return
        if info["incarnation"] != handle.incarnation and b.placement.state(name) != DOWN:
            self.worker_failed(name, handle.incarnation, "its process was restarted")
        if b.placement.state(name) == DOWN:
            self._rejoin(name, info)

    def _rejoin(self, name: str, info: dict) -> None:
        b = self.backend
        handle = b.handle(name)
        handle.incarnation, handle.info = info["incarnation"], info
        # The same incarnation: it never died (a call to it failed in transit), so it still has
        # the adapters that were re-homed meanwhile: free them, they live elsewhere now.
        for adapter_id in b.workers.ray.get(handle.actor.held.remote()):
            try:
                b._invoke(name, "remove_adapter", adapter_id)
            except Exception:  # noqa: BLE001 - freeing memory only: the placement no longer points here
                log.warning("could not free %s on rejoining worker %s", adapter_id, name)
        if b._sampler_args is not None:
            b._invoke(name, "start_sampler", *b._sampler_args)
        b.placement.set_state(name, UP)
        log.warning("worker %s rejoined (pid %s), empty", name, info["pid"])
        self.note(f"worker {name} rejoined (pid {info['pid']})")

    # ---- moves and replicas ---------------------------------------------------------------------

    def move(self, adapter_id: str, source: str | None = None, target: str | None = None) -> str:
        """Move an adapter (weights + optimizer state) off ``source`` (default: its home) to
        ``target`` (default: the least loaded other worker); where it is now. Run it in the
        adapter's turn (a job keyed by its id), so nothing of it runs meanwhile. The state
        travels through Ray's object store, not the data dir."""
        b = self.backend
        adapter = b.adapters.get(adapter_id)
        homes = b.placement.homes(adapter_id)
        source = source or (homes[0] if homes else None)
        if source not in homes:
            raise RequestFailedError(f"{adapter_id} is not on worker {source}")
        if len(homes) > 1:  # a sampler replica: the other copies serve on
            b.placement.unplace(adapter_id, source)
            b._invoke(source, "remove_adapter", adapter_id)
            return b.placement.home(adapter_id)
        target = target or b.placement.choose(group=adapter.owner, exclude=(source,))
        src, dest, ray = b.handle(source), b.handle(target), b.workers.ray
        b.placement.begin(source)
        exported = src.actor.export_state.remote(src.incarnation, adapter_id)
        files = b._outcome(source, src, "move", lambda: ray.get(exported))
        b.placement.begin(target)
        b._outcome(target, dest, "move", lambda: ray.get(dest.actor.import_state.remote(
            dest.incarnation, files, adapter_id, adapter.owner, adapter.step, adapter.trainable)))
        b.placement.place(adapter_id, target)
        b.placement.unplace(adapter_id, source)
        try:
            b._invoke(source, "remove_adapter", adapter_id)
        except Exception:  # noqa: BLE001 - the source going away takes it with it anyway
            log.warning("could not free %s on %s after moving it", adapter_id, source)
        self.note(f"moved {adapter_id}: {source} -> {target}")
        return target

    def drain_start(self, name: str) -> list[str]:
        """Stop placing on ``name``; the adapters to move away (the caller moves each in its turn)."""
        b = self.backend
        b.handle(name)
        b.placement.set_state(name, DRAINING)
        self.note(f"worker {name} draining")
        return b.placement.held(name)

    def drain_finish(self, name: str) -> None:
        b = self.backend
        with b._lock:  # (out of the handles first: a failure seen from now on is no loss)
            handle = b._handles.pop(name)
        b.placement.remove_worker(name)
        b.workers.kill(handle)
        self.note(f"worker {name} drained and stopped")

    def maybe_replicate(self, adapter_id: str, homes: list[str]) -> threading.Thread | None:
        """Load a sampler checkpoint on one more worker when every copy is busy; the loading
        thread (requests meanwhile go to the copies there are), or None."""
        b = self.backend
        if adapter_id not in self.sources or adapter_id in self._replicating:
            return None
        if min(b.placement.busy(w) for w in homes) < REPLICATE_WHEN_BUSY:
            return None
        spare = [w for w in b.placement.workers(UP) if w not in homes]
        if not spare:
            return None
        target = b.placement.least_busy(spare)
        self._replicating.add(adapter_id)

        def load() -> None:
            try:
                folder = self.sources[adapter_id]
                owner = b.adapters.get(adapter_id).owner
                b._invoke(target, "create_from_checkpoint", folder, adapter_id, False, False, owner)
                if adapter_id in b.adapters:
                    b.placement.place(adapter_id, target)
                    self.note(f"sampler weights {adapter_id} replicated on {target}")
                else:  # freed meanwhile
                    b._invoke(target, "remove_adapter", adapter_id)
            except Exception:  # noqa: BLE001 - a replica is an optimisation: requests still run on the others
                log.exception("could not replicate %s on %s", adapter_id, target)
            finally:
                self._replicating.discard(adapter_id)

        thread = threading.Thread(target=load, name="thinker-cluster-replica", daemon=True)
        thread.start()
        return thread
