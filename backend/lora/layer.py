"""Multi-adapter LoRA on a shared base model, routed per batch row.

PEFT's ``set_adapter()`` flips one global "active adapter" on the model, so two threads
training different adapters on one model would train each other's. Here each target
``nn.Linear`` is wrapped in a ``MultiLoraLinear`` that holds every adapter's own A/B
(its own rank and scaling) and reads which adapter each row uses from a ``ContextVar``
set for the duration of one forward call. Context variables are per thread, so
concurrent forwards on different threads never see each other's routing.

One call may mix rows of many adapters: their A/B are stacked (zero-padded to the
largest rank, which adds exactly nothing) and every row is routed to its own adapter by
one batched matrix product, not a loop over rows or adapters. Only adapters that had
rows get gradients.

Math per adapter (PEFT's): y = W x + (alpha / r) * B (A x), with A (r, in), B (out, r).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Which adapter each row of one forward call uses."""

    row_adapters: tuple[str | None, ...]  # (B,) adapter id per row; None: base model only
    adapters: tuple[str, ...]  # the distinct adapters, in slot order (slot 0 is "none")
    slots_B: torch.Tensor | None  # (B,) long slot per row; None when every row uses one adapter
    # Stacked weights per layer, reusable while the adapters' weights cannot change (for
    # instance across the decode steps of one sampling batch); None: build per call.
    weight_cache: dict | None = field(default=None)

    @property
    def uniform(self) -> bool:
        return self.slots_B is None

    @classmethod
    def build(
        cls,
        row_adapters: Sequence[str | None],
        device: torch.device | str = "cpu",
        adapter_order: Sequence[str] | None = None,
        weight_cache: dict | None = None,
    ) -> Routing:
        rows = tuple(row_adapters)
        distinct = tuple(adapter_order) if adapter_order is not None else tuple(dict.fromkeys(a for a in rows if a))
        if len(set(rows)) <= 1:
            return cls(rows, distinct, None, weight_cache)
        slot_of = {a: i + 1 for i, a in enumerate(distinct)}
        slots = torch.tensor([slot_of[a] if a else 0 for a in rows], dtype=torch.long, device=device)
        return cls(rows, distinct, slots, weight_cache)


_routing: ContextVar[Routing | None] = ContextVar("thinker_lora_routing", default=None)


@contextmanager
def use_adapters(
    row_adapters: Sequence[str | None] | Routing, device: torch.device | str = "cpu"
) -> Iterator[Routing]:
    """Route this thread's forward calls: row i uses ``row_adapters[i]`` (None: base)."""
    routing = row_adapters if isinstance(row_adapters, Routing) else Routing.build(row_adapters, device)
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
        if len(routing.row_adapters) != x.shape[0]:
            raise RuntimeError(f"LoRA routing covers {len(routing.row_adapters)} rows but the batch has {x.shape[0]}")
        if routing.uniform:
            adapter_id = routing.row_adapters[0] if routing.row_adapters else None
            a = self.lora_A.get(adapter_id) if adapter_id else None
            if a is None:
                return out
            h = x @ a.to(x.dtype).t()  # (B, T, r)
            b_scaled = self.lora_B[adapter_id].to(x.dtype) * self.scaling[adapter_id]  # (out, r): scale the small side
            # out + h @ B^T in one pass over the (B, T, out) output
            return torch.addmm(out.flatten(0, -2), h.flatten(0, -2), b_scaled.t()).view_as(out)
        rows = self._routed_rows(routing, x.dtype)
        if rows is None:  # none of the batch's adapters targets this layer
            return out
        a_BRI, b_BOR = rows
        h_BTR = torch.bmm(x, a_BRI.transpose(1, 2))  # (B, T, in) @ (B, in, R) -> (B, T, R)
        return torch.baddbmm(out, h_BTR, b_BOR.transpose(1, 2))  # out + (B, T, R) @ (B, R, O)

    def _routed_rows(self, routing: Routing, dtype: torch.dtype):
        """Each row's own A (B, R, in) and scaled B (B, out, R), gathered from the stack."""
        cache, key = routing.weight_cache, ("rows", self.name, routing.row_adapters)
        if cache is not None and key in cache:
            return cache[key]
        stacked = self._stacked(routing, dtype)
        rows = None if stacked is None else (stacked[0][routing.slots_B], stacked[1][routing.slots_B])
        if cache is not None:
            cache[key] = rows
        return rows

    def _stacked(self, routing: Routing, dtype: torch.dtype):
        """Every routed adapter's A and scaled B, zero-padded to the largest rank and
        stacked by slot (slot 0, and adapters that do not target this layer, are zeros):
        A (S, R, in), B * scaling (S, out, R)."""
        cache, key = routing.weight_cache, ("stack", self.name, routing.adapters)
        if cache is not None and key in cache:
            return cache[key]
        present = [a for a in routing.adapters if a in self.lora_A]
        if not present:
            result = None
        else:
            rank = max(self.lora_A[a].shape[0] for a in present)
            weight = self.base.weight
            zeros_a = weight.new_zeros(rank, self.in_features, dtype=dtype)
            zeros_b = weight.new_zeros(self.out_features, rank, dtype=dtype)
            a_list, b_list = [zeros_a], [zeros_b]
            for adapter_id in routing.adapters:
                a = self.lora_A.get(adapter_id)
                if a is None:
                    a_list.append(zeros_a)
                    b_list.append(zeros_b)
                    continue
                pad = rank - a.shape[0]
                b_scaled = self.lora_B[adapter_id].to(dtype) * self.scaling[adapter_id]
                a_list.append(F.pad(a.to(dtype), (0, 0, 0, pad)))  # extra rows of A: zero
                b_list.append(F.pad(b_scaled, (0, pad)))  # extra columns of B: zero
            result = (torch.stack(a_list), torch.stack(b_list))
        if cache is not None:
            cache[key] = result
        return result


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
