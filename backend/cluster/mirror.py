"""The server's mirror of the adapters that live on the workers.

The HTTP layer reads ``backend.adapters`` (owner checks, quotas, the dashboard, the durable
registry's hooks) exactly as it does with one process. Here that registry holds records only:
the weights and optimizer state are on the adapter's worker; the counters (step, tokens, loss
history) are kept by the facade from what each job returns. Ids and per-owner quotas are
claimed here, before the worker builds the adapter, with LiveAdapters' own locking rules.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from backend.lora.adapters import Adapter, LiveAdapters
from thinker.core.errors import NotFoundError


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
        return self._claim_and_build(
            adapter_id, trainable, owner, lambda new_id: record_from(build(new_id), trainable, owner)
        )

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
