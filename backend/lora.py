"""Multi-adapter LoRA on a shared base model, routed per batch row.

PEFT's ``set_adapter()`` flips one global "active adapter" on the model, so two threads
training different adapters on one model would train each other's. Here each target
``nn.Linear`` is wrapped in a ``MultiLoraLinear`` that holds every adapter's own A/B
(its own rank and scaling) and reads which adapter each row uses from a ``ContextVar``
set for the duration of one forward call. Context variables are per thread, so
concurrent forwards on different threads never see each other's routing, and one call
may mix rows of several adapters (only the adapters that saw rows get gradients).

Math per adapter (PEFT's): y = W x + (alpha / r) * B (A x), with A (r, in), B (out, r).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch use adapter ``adapter_id`` (None: base model only)."""

    adapter_id: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Routing:
    """The adapter of every row of one forward call, as runs of consecutive rows."""

    segments: tuple[Segment, ...]
    batch_size: int

    @classmethod
    def from_rows(cls, row_adapters: Sequence[str | None]) -> Routing:
        segments: list[Segment] = []
        start = 0
        for i in range(1, len(row_adapters) + 1):
            if i == len(row_adapters) or row_adapters[i] != row_adapters[start]:
                segments.append(Segment(row_adapters[start], start, i))
                start = i
        return cls(tuple(segments), len(row_adapters))


_routing: ContextVar[Routing | None] = ContextVar("thinker_lora_routing", default=None)


@contextmanager
def use_adapters(row_adapters: Sequence[str | None]) -> Iterator[Routing]:
    """Route this thread's forward calls: row i uses ``row_adapters[i]`` (None: base)."""
    routing = Routing.from_rows(row_adapters)
    token = _routing.set(routing)
    try:
        yield routing
    finally:
        _routing.reset(token)


class MultiLoraLinear(nn.Module):
    """An ``nn.Linear`` plus any number of LoRA adapters, chosen per row by the routing."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
        # Plain dicts, not ParameterDicts: adapters come and go while other threads run
        # forwards, and the base model's parameter list must never change under them.
        self.lora_A: dict[str, nn.Parameter] = {}
        self.lora_B: dict[str, nn.Parameter] = {}
        self.scaling: dict[str, float] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, adapter_id: str, rank: int, alpha: float, generator: torch.Generator) -> None:
        """Create A with PEFT's default init (Kaiming-uniform) and B = 0, so a new adapter
        leaves the base model's outputs unchanged."""
        weight = self.base.weight
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A[adapter_id] = nn.Parameter(a.to(weight.device))
        self.lora_B[adapter_id] = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=torch.float32, device=weight.device)
        )
        self.scaling[adapter_id] = alpha / rank

    def remove_adapter(self, adapter_id: str) -> None:
        self.scaling.pop(adapter_id, None)
        self.lora_A.pop(adapter_id, None)
        self.lora_B.pop(adapter_id, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (B, T, out)
        routing = _routing.get()
        if routing is None or not self.lora_A:
            return out
        if routing.batch_size != x.shape[0]:
            raise RuntimeError(f"LoRA routing covers {routing.batch_size} rows but the batch has {x.shape[0]}")
        if len(routing.segments) == 1:
            delta = self._delta(routing.segments[0].adapter_id, x)
            return out if delta is None else out + delta
        pieces = []
        for seg in routing.segments:
            x_seg = x[seg.start : seg.end]  # (b, T, in), a view: rows are contiguous
            delta = self._delta(seg.adapter_id, x_seg)
            pieces.append(delta if delta is not None else x_seg.new_zeros(*x_seg.shape[:-1], self.out_features))
        return out + torch.cat(pieces, dim=0)

    def _delta(self, adapter_id: str | None, x: torch.Tensor) -> torch.Tensor | None:
        """(alpha/r) * B(A x) for rows x (b, T, in) -> (b, T, out); None if not targeted."""
        if adapter_id is None:
            return None
        a = self.lora_A.get(adapter_id)
        b = self.lora_B.get(adapter_id)
        if a is None or b is None:
            return None
        h = x @ a.to(x.dtype).t()  # (b, T, r)
        return (h @ b.to(x.dtype).t()) * self.scaling[adapter_id]  # (b, T, out)


def wrap_linear_layers(model: nn.Module, candidate_names: Sequence[str]) -> dict[str, MultiLoraLinear]:
    """Replace every ``nn.Linear`` whose last name is in ``candidate_names`` (never the
    output head) by a MultiLoraLinear; returns them keyed by module path."""
    wanted = set(candidate_names)
    found: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for path, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in wanted:
                full = f"{path}.{child_name}" if path else child_name
                found.append((module, child_name, full, child))
    layers: dict[str, MultiLoraLinear] = {}
    for parent, child_name, full, child in found:
        wrapper = MultiLoraLinear(child, full)
        setattr(parent, child_name, wrapper)
        layers[full] = wrapper
    return layers


def short_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]
