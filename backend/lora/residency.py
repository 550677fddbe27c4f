"""Which adapters sit on the accelerator: at most ``max_resident`` at a time.

A server may hold a thousand registered adapters while only a few train or sample at any
moment. Each adapter's tensors (A/B, their gradients, AdamW's moments) live on the
accelerator only while it is in use or recently used; the least recently used idle ones
are moved to CPU memory (pinned, so they copy back fast) and moved back, transparently,
the next time a job or the decode loop touches them. Moving keeps every ``nn.Parameter``
object (only ``.data`` changes), so the optimizer's references stay valid.

Every model computation names its adapters through ``using(ids)``: they are brought in,
marked in use (never offloaded while in use, even by a job on another thread), and the
least recently used idle adapters beyond the limit go out. On a CPU-only server both
places are the same memory, so moves cost nothing and only the bookkeeping runs.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from backend.lora.adapters import Adapter, LiveAdapters


class Residency:
    def __init__(self, registry: LiveAdapters, device: torch.device, max_resident: int) -> None:
        self.registry = registry
        self.device = device
        self.max_resident = max_resident
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.offloads = 0  # adapters moved out, since start
        self.reloads = 0  # adapters moved back in
        registry.created_hooks.append(self._created)
        registry.removed_hooks.append(self._removed)

    @property
    def resident(self) -> int:
        return len(self._resident)

    @contextmanager
    def using(self, adapter_ids: Iterable[str | None]) -> Iterator[None]:
        """Hold these adapters on the accelerator for the duration (None: the base model)."""
        ids = {a for a in adapter_ids if a}
        with self._lock:
            for adapter_id in ids:
                self._bring_in(adapter_id)
                self._in_use[adapter_id] += 1  # (an unknown id too: harmless, and undone below)
            self._offload_beyond_limit()
        try:
            yield
        finally:
            with self._lock:
                self._in_use.subtract(ids)
                for adapter_id in ids:
                    if self._in_use[adapter_id] <= 0:
                        del self._in_use[adapter_id]

    def _bring_in(self, adapter_id: str) -> None:
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)
            return
        adapter = self.registry.find(adapter_id)
        if adapter is None:
            return  # gone (the caller's own lookup says so); nothing to hold
        _move(adapter, self.device)
        self._resident[adapter_id] = None
        self.reloads += 1

    def _offload_beyond_limit(self) -> None:
        excess = len(self._resident) - self.max_resident
        for adapter_id in list(self._resident):
            if excess <= 0:
                return
            if self._in_use.get(adapter_id):
                continue
            adapter = self.registry.find(adapter_id)
            if adapter is not None:
                _move(adapter, torch.device("cpu"), pin=self.device.type == "cuda")
                self.registry.release_compute_copies(adapter)  # its bf16 slot buffers leave too
            del self._resident[adapter_id]
            self.offloads += 1
            excess -= 1

    def _created(self, adapter: Adapter) -> None:
        """A new adapter starts on the accelerator (where its layers made it): count it."""
        with self._lock:
            self._resident[adapter.id] = None
            self._offload_beyond_limit()

    def _removed(self, adapter: Adapter) -> None:
        with self._lock:
            self._resident.pop(adapter.id, None)


@torch.no_grad()
def _move(adapter: Adapter, device: torch.device, pin: bool = False) -> None:
    """Move an adapter's weights, gradients and optimizer state to ``device``."""

    if adapter.flat is not None:  # its tensors are views into flat buffers: move those
        adapter.flat.move(device, adapter.optimizer, pin)
        return

    def moved(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.pin_memory() if pin else t

    for p in adapter.params:
        p.data = moved(p.data)
        if p.grad is not None:
            p.grad = moved(p.grad)
    for state in adapter.optimizer.state.values() if adapter.optimizer is not None else ():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = moved(value)
