"""The placement table: which worker holds which adapter. Pure bookkeeping, no Ray.

Rules:
- sticky: an adapter stays on its worker until it is moved (drain, rebalance) or its worker dies;
- a new adapter goes to the least loaded worker that is up, except that one group's adapters
  (one owner's, or one Tinker session's) go together while that worker is not more than
  ``slack`` adapters above the least loaded one: adapters on one worker fuse into one pass;
- a trainable adapter has exactly one home; a frozen one (sampler weights) may have replicas
  on several workers, and its requests go to the least busy of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

UP, DRAINING, DOWN = "up", "draining", "down"


@dataclass
class Slot:
    name: str
    state: str = UP
    adapters: set[str] = field(default_factory=set)
    busy: int = 0  # calls the facade has in flight to it


class Placement:
    def __init__(self, slack: int = 4) -> None:
        self.slack = slack
        self._lock = threading.Lock()
        self._slots: dict[str, Slot] = {}
        self._homes: dict[str, list[str]] = {}  # adapter id -> workers holding it (first: its home)
        self._groups: dict[str, str] = {}  # group -> the worker its adapters went to

    # ---- workers --------------------------------------------------------------------------

    def add_worker(self, name: str) -> None:
        with self._lock:
            self._slots[name] = Slot(name)

    def set_state(self, name: str, state: str) -> None:
        with self._lock:
            self._slots[name].state = state

    def state(self, name: str) -> str:
        with self._lock:
            return self._slots[name].state

    def workers(self, state: str | None = None) -> list[str]:
        with self._lock:
            return [s.name for s in self._slots.values() if state is None or s.state == state]

    def remove_worker(self, name: str) -> None:
        with self._lock:
            self._slots.pop(name, None)

    def evict(self, name: str) -> list[str]:
        """Forget everything placed on ``name`` (it died); the adapters it held, in order."""
        with self._lock:
            held = sorted(self._slots[name].adapters)
            self._slots[name].adapters.clear()
            for adapter_id in held:
                homes = [w for w in self._homes.get(adapter_id, []) if w != name]
                if homes:
                    self._homes[adapter_id] = homes
                else:
                    self._homes.pop(adapter_id, None)
            return held

    # ---- adapters -------------------------------------------------------------------------

    def choose(self, group: str | None = None, exclude: tuple[str, ...] = ()) -> str:
        """The worker a new adapter (of ``group``) should go to."""
        with self._lock:
            up = [s for s in self._slots.values() if s.state == UP and s.name not in exclude]
            if not up:
                raise LookupError("no model worker is up")
            least = min(up, key=lambda s: (len(s.adapters), s.busy))
            if group is not None and (home := self._slots.get(self._groups.get(group, ""))) in up:
                if len(home.adapters) <= len(least.adapters) + self.slack:
                    return home.name
            if group is not None:
                self._groups[group] = least.name
            return least.name

    def place(self, adapter_id: str, worker: str) -> None:
        with self._lock:
            homes = self._homes.setdefault(adapter_id, [])
            if worker not in homes:
                homes.append(worker)
            self._slots[worker].adapters.add(adapter_id)

    def unplace(self, adapter_id: str, worker: str | None = None) -> list[str]:
        """Take ``adapter_id`` off ``worker`` (None: off all); the workers it was on."""
        with self._lock:
            homes = self._homes.get(adapter_id, [])
            gone = [w for w in homes if worker is None or w == worker]
            for w in gone:
                if w in self._slots:
                    self._slots[w].adapters.discard(adapter_id)
            left = [w for w in homes if w not in gone]
            if left:
                self._homes[adapter_id] = left
            else:
                self._homes.pop(adapter_id, None)
            return gone

    def homes(self, adapter_id: str) -> list[str]:
        with self._lock:
            return list(self._homes.get(adapter_id, []))

    def home(self, adapter_id: str) -> str | None:
        homes = self.homes(adapter_id)
        return homes[0] if homes else None

    def least_busy(self, among: list[str] | None = None) -> str:
        """The worker with the fewest calls in flight (for the base model and replicas)."""
        with self._lock:
            up = [s for s in self._slots.values() if s.state != DOWN and (among is None or s.name in among)]
            if not up:
                raise LookupError("no model worker is up")
            return min(up, key=lambda s: (s.busy, len(s.adapters))).name

    def busy(self, name: str) -> int:
        with self._lock:
            return self._slots[name].busy if name in self._slots else 0

    def held(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._slots[name].adapters)

    def rebalance_plan(self) -> list[tuple[str, str, str]]:
        """Moves (adapter, from, to) that leave every up worker within one adapter of the others;
        only single-copy adapters move (a replica is not worth the traffic)."""
        with self._lock:
            up = {s.name: sorted(s.adapters) for s in self._slots.values() if s.state == UP}
            movable = {a for a, homes in self._homes.items() if len(homes) == 1}
        plan: list[tuple[str, str, str]] = []
        while len(up) > 1:
            most = max(up, key=lambda w: len(up[w]))
            least = min(up, key=lambda w: len(up[w]))
            candidates = [a for a in up[most] if a in movable]
            if len(up[most]) - len(up[least]) <= 1 or not candidates:
                break
            adapter_id = candidates[-1]
            up[most].remove(adapter_id)
            up[least].append(adapter_id)
            plan.append((adapter_id, most, least))
        return plan

    # ---- load accounting --------------------------------------------------------------------

    def begin(self, name: str) -> None:
        with self._lock:
            if name in self._slots:
                self._slots[name].busy += 1

    def end(self, name: str) -> None:
        with self._lock:
            if name in self._slots:
                self._slots[name].busy -= 1

    def table(self) -> list[dict]:
        with self._lock:
            return [
                {"name": s.name, "state": s.state, "adapters_placed": len(s.adapters), "queue": s.busy}
                for s in self._slots.values()
            ]
