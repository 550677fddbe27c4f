"""The server's mirror of the adapters that live on the workers.

The HTTP layer reads ``backend.adapters`` (owner checks, quotas, the dashboard, the durable
registry's hooks) exactly as it does with one process. Here that registry holds records only:
the weights and optimizer state are on the adapter's worker; the counters (step, tokens, loss
history) are kept by the facade from what each job returns. Ids and per-owner quotas are
claimed here, before the worker builds the adapter, with LiveAdapters' own locking rules.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from types import SimpleNamespace

import torch

from backend.lora.adapters import Adapter, LiveAdapters
from thinker.core.errors import BadRequestError, ConflictError, NotFoundError


def record_from(described: dict, trainable: bool, owner: str | None) -> Adapter:
    """An Adapter record from a worker's ``describe()``: ``params`` is one meta tensor of the
    adapter's size (what size checks read; no memory), ``optimizer`` a stand-in whose
    ``state`` is filled once the adapter has stepped (checkpoint sizes read that)."""
    adapter = Adapter(
        id=described["model_id"],
        rank=described["rank"],
        alpha=described["alpha"],
        target_modules=list(described["target_modules"]),
        seed=described["seed"],
        layer_names=[],
        params=[torch.empty(int(described["num_parameters"]), device="meta")],
        optimizer=SimpleNamespace(state={}) if trainable else None,
        trainable=trainable,
        owner=owner,
        step=described["step"],
        tokens_trained=described["tokens_trained"],
        last_loss=described["last_loss"],
    )
    if described["created_at"]:
        adapter.created_at = described["created_at"]
    return adapter


class ClusterAdapters(LiveAdapters):
    """LiveAdapters whose adapters are built remotely: ``create`` takes a ``build(adapter_id)``
    that makes it on a worker and returns its ``describe()``."""

    def __init__(self) -> None:
        super().__init__({})

    def create(  # type: ignore[override]
        self,
        build: Callable[[str], dict],
        adapter_id: str | None = None,
        trainable: bool = True,
        owner: str | None = None,
    ) -> Adapter:
        adapter_id = adapter_id or f"{self._prefix}{secrets.token_hex(6)}"
        with self._lock:
            if adapter_id in self._adapters or adapter_id in self._creating:
                raise ConflictError(f"model_id {adapter_id!r} already exists")
            if trainable and self.max_per_owner is not None:
                held = sum(1 for a in self._adapters.values() if a.owner == owner and a.trainable)
                held += sum(1 for who, train in self._creating.values() if who == owner and train)
                if held >= self.max_per_owner:
                    raise BadRequestError(
                        f"adapters: you hold {held}, the limit per user (MAX_ADAPTERS_PER_USER) is {self.max_per_owner}"
                    )
            self._creating[adapter_id] = (owner, trainable)
        try:
            adapter = record_from(build(adapter_id), trainable, owner)
            with self._lock:
                self._adapters[adapter_id] = adapter
        finally:
            with self._lock:
                del self._creating[adapter_id]
        for hook in self.created_hooks:
            hook(adapter)
        return adapter

    def drop(self, adapter_id: str) -> Adapter | None:
        """Forget a record without telling the observers (its worker died: the durable
        registry marks it lost rather than deleted)."""
        with self._lock:
            return self._adapters.pop(adapter_id, None)

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(adapter_id, None)
        if adapter is None:
            raise NotFoundError(self.missing_message(adapter_id))
        for hook in self.removed_hooks:
            hook(adapter)
