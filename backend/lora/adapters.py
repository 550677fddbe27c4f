"""The adapter registry: each LoRA adapter's config, parameters, optimizer and counters.

The A/B tensors live in the model's ``MultiLoraLinear`` layers (keyed by adapter id);
an ``Adapter`` keeps references to its own, so its optimizer never sees anyone else's.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.lora.flat import FlatBuffers
from backend.lora.layer import MultiLoraLinear, short_name
from thinker.core.errors import BadRequestError, ConflictError, NotFoundError


@dataclass
class Adapter:
    id: str
    rank: int
    alpha: float
    target_modules: list[str]  # short names, e.g. ["q_proj", "v_proj"]
    seed: int
    layer_names: list[str]  # module paths it has weights in, sorted
    params: list[nn.Parameter]  # A then B for each layer in layer_names
    # None for frozen adapters: their params do not require grad and nothing ever steps them
    optimizer: torch.optim.AdamW | None
    # Trainable adapters: params (their grads, their AdamW state) are views into flat buffers,
    # so a step of many adapters runs over one tensor each (backend/lora/flat.py)
    flat: FlatBuffers | None = None
    trainable: bool = True  # False: a frozen copy serving samplers (a checkpoint or snapshot)
    owner: str | None = None  # who created it (see auth.py); others cannot see it
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    pins: int = 0  # sampling requests in flight on it: a frozen adapter is never freed while pinned
    step: int = 0
    tokens_trained: int = 0
    user_metadata: dict[str, str] = field(default_factory=dict)
    last_loss: float | None = None
    # (time, step, loss) of each training forward-backward, newest last: the dashboard's loss curve
    loss_history: deque = field(default_factory=lambda: deque(maxlen=2000))

    def describe(self) -> dict:
        return {
            "model_id": self.id,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "seed": self.seed,
            "step": self.step,
            "tokens_trained": self.tokens_trained,
            "last_loss": self.last_loss,
            "num_parameters": sum(p.numel() for p in self.params),
            "created_at": self.created_at,
        }


def new_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.AdamW:
    """An adapter's AdamW, with no moments yet: the keeper of its state (moments and step
    counters, saved as optimizer.pt in torch's state_dict format). Steps do not call its
    ``step()``: lora/optimizer.py steps many adapters' states in one fused launch, with the
    kernel ``fused=True`` selects (so the state is laid out as that kernel wants it)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)


def not_found(adapter_id: str) -> str:
    return f"model_id {adapter_id!r} is not an adapter on this server"


class LiveAdapters:
    """The adapters live on the model now (weights in the LoRA layers, optimizer state), by id.
    Their durable records (which survive a restart) are thinker.store.adapter_records'."""

    def __init__(self, layers: dict[str, MultiLoraLinear], id_prefix: str = "base_lora_") -> None:
        self._layers = layers
        self._prefix = id_prefix
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        # Observers (the durable registry, residency): told of each adapter made or removed
        self.created_hooks: list[Callable[[Adapter], None]] = []
        self.removed_hooks: list[Callable[[Adapter], None]] = []
        self.missing_message: Callable[[str], str] = not_found  # why an id is not here
        # Trainable adapters one owner may hold (MAX_ADAPTERS_PER_USER); None: no limit.
        self.max_per_owner: int | None = None
        self._creating: dict[str, tuple[str | None, bool]] = {}  # id -> (owner, trainable) being built

    def create(
        self,
        rank: int,
        alpha: float,
        target_modules: Sequence[str],
        seed: int | None,
        adapter_id: str | None = None,
        trainable: bool = True,
        owner: str | None = None,
    ) -> Adapter:
        """A new adapter (A random from ``seed``, B zero). ``adapter_id``: the id to use (the
        Tinker API names its models itself); taken ids are refused, and so is a trainable
        adapter beyond ``max_per_owner``. The id and the owner's quota are claimed in one lock
        section (ids being built count), so concurrent creations cannot both pass a check."""
        return self._claim_and_build(
            adapter_id, trainable, owner,
            lambda new_id: self._build(rank, alpha, target_modules, seed, new_id, trainable, owner),
        )

    def _claim_and_build(
        self, adapter_id: str | None, trainable: bool, owner: str | None, build: Callable[[str], Adapter]
    ) -> Adapter:
        """Claim the id and the owner's quota, ``build(adapter_id)`` outside the lock, register
        the adapter and tell the observers: the one creation path, also for remote builds."""
        adapter_id = adapter_id or f"{self._prefix}{secrets.token_hex(6)}"
        with self._lock:
            if adapter_id in self._adapters or adapter_id in self._creating:
                raise ConflictError(f"model_id {adapter_id!r} already exists")
            if trainable and self.max_per_owner is not None:
                held = sum(1 for a in self._adapters.values() if a.owner == owner and a.trainable)
                held += sum(1 for who, train in self._creating.values() if who == owner and train)
                if held >= self.max_per_owner:
                    limit = self.max_per_owner
                    raise BadRequestError(
                        f"adapters: you hold {held}, the limit per user (MAX_ADAPTERS_PER_USER) is {limit}"
                    )
            self._creating[adapter_id] = (owner, trainable)
        try:
            adapter = build(adapter_id)
            with self._lock:
                self._adapters[adapter_id] = adapter
        finally:
            with self._lock:
                del self._creating[adapter_id]
        for hook in self.created_hooks:
            hook(adapter)
        return adapter

    def _build(
        self, rank: int, alpha: float, target_modules: Sequence[str], seed: int | None, adapter_id: str,
        trainable: bool, owner: str | None,
    ) -> Adapter:
        seed = secrets.randbits(31) if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        wanted = set(target_modules)
        layer_names = sorted(name for name in self._layers if short_name(name) in wanted)
        params: list[nn.Parameter] = []
        for name in layer_names:  # fixed order: the same seed gives the same weights
            layer = self._layers[name]
            layer.add_adapter(adapter_id, rank, alpha, generator)
            params += [layer.lora_A[adapter_id], layer.lora_B[adapter_id]]
        if not trainable:
            # Sampler weights: no autograd bookkeeping, no optimizer (a frozen snapshot must
            # cost its weights and nothing more).
            for p in params:
                p.requires_grad_(False)
        # After every parameter is registered (whatever kind): the flat buffers take them all.
        flat = FlatBuffers.adopt(params) if trainable else None
        optimizer = new_optimizer(params) if trainable else None
        return Adapter(
            id=adapter_id,
            rank=rank,
            alpha=alpha,
            target_modules=sorted(wanted),
            seed=seed,
            layer_names=layer_names,
            params=params,
            optimizer=optimizer,
            flat=flat,
            trainable=trainable,
            owner=owner,
        )

    def get(self, adapter_id: str) -> Adapter:
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise NotFoundError(self.missing_message(adapter_id))
        return adapter

    def find(self, adapter_id: str) -> Adapter | None:
        return self._adapters.get(adapter_id)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._adapters

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(adapter_id, None)
        if adapter is None:
            raise NotFoundError(not_found(adapter_id))
        for name in adapter.layer_names:
            self._layers[name].remove_adapter(adapter_id)
        for hook in self.removed_hooks:
            hook(adapter)

    def release_compute_copies(self, adapter: Adapter) -> None:
        """Drop the adapter's compute-dtype slot buffers: it is leaving the device, or it just
        stepped (a fused optimizer step changes weights without bumping their versions)."""
        for name in adapter.layer_names:
            self._layers[name].release_compute_copy(adapter.id)

    def pin(self, adapter_id: str) -> None:
        with self._lock:
            adapter = self.get(adapter_id)
            adapter.pins += 1
            adapter.last_used_at = time.time()

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            adapter = self._adapters.get(adapter_id)
            if adapter is not None:
                adapter.pins -= 1
                adapter.last_used_at = time.time()

    def idle(self, adapter_id: str, for_s: float) -> bool:
        """True if nothing uses the adapter now and nothing did for ``for_s`` seconds."""
        with self._lock:
            adapter = self._adapters.get(adapter_id)
            return adapter is not None and adapter.pins == 0 and time.time() - adapter.last_used_at >= for_s

    def all(self) -> list[Adapter]:
        with self._lock:
            return list(self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)
