"""Multi-adapter LoRA on a shared base model: one wrapped layer, tokens routed by segment.

PEFT's ``set_adapter()`` flips one global "active adapter" on the model, so two users
training different adapters on one model would train each other's. Here each target
layer (``nn.Linear``, or transformers' ``Conv1D`` whose weight is stored (in, out)) is
wrapped in a ``MultiLoraLinear`` that holds every adapter's own A/B (its own rank and
scaling) and applies to each token the adapter the pass's ``Routing`` gives it
(backend/lora/routing.py).

Semantics, with x the layer input flattened to (N, in) and y = base(x) of shape (N, out),
for every adapter i routed in the pass that targets this layer, owning tokens S_i
(a contiguous range [s_i, e_i) in the common case, else an index list):

    h_i = x[S_i] @ A_i^T                 # (|S_i|, r_i)     A_i: (r_i, in)
    y[S_i] += scale_i * h_i @ B_i^T      # (|S_i|, out)     B_i: (out, r_i), scale_i = alpha_i / r_i

Tokens in no segment (rows on the base model) keep y = base(x). ``SegmentedLora`` runs
this as one autograd node per layer: each adapter's weights are read once, by the matmuls
themselves (no per-row or per-token weight copies, no padding to the largest rank), the
expand adds into the base output's rows in place, and backward keeps only x (a view:
A's gradient needs it) and each h_i. A loop over the pass's adapters was measured
against ``torch.nn.functional.grouped_mm`` with one call per distinct rank
(bench/bench_lora_layer.py, CPU fp32): grouped_mm needs the adapters' weights stacked per
call (a copy that its backward keeps), the tokens permuted by rank, and was no faster;
see docs/lora-core.md.

Weights: the fp32 masters (what the optimizer steps) are the ``lora_A``/``lora_B``
parameters. When the activations are fp32 (CPU), the masters ARE the compute weights
(no copy at all). On a bf16 model the branch computes in bf16 (docs/lora-core.md compares
this with PEFT's numerics) from a per-layer slot buffer of compute-dtype copies, made on
first use and remade when the master's version, storage or dtype changed (a checkpoint
load, a residency move) or the buffer was released (after every optimizer step: fused
AdamW leaves version counters alone; and when the adapter leaves the device); training
reads the same buffers, and its gradients land on the fp32 masters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from backend.lora.routing import Routing, current_routing, use_adapters

__all__ = ["MultiLoraLinear", "Routing", "is_lora_target", "short_name", "use_adapters", "wrap_linear_layers"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; be safe anyway
        return None
    return Conv1D


def is_lora_target(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's c_attn, c_proj, c_fc)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


class MultiLoraLinear(nn.Module):
    """A linear layer (``nn.Linear`` or ``Conv1D``) plus any number of LoRA adapters."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
        # Conv1D keeps its weight as (in, out): PEFT calls this fan_in_fan_out. The LoRA
        # matrices keep PEFT's layout either way: A (r, in), B (out, r).
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        in_features, out_features = base.weight.shape[::-1] if not self.fan_in_fan_out else base.weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        # Plain dicts, not ParameterDicts: adapters come and go while other threads run
        # forwards, and the base model's parameter list must never change under them.
        self.lora_A: dict[str, nn.Parameter] = {}
        self.lora_B: dict[str, nn.Parameter] = {}
        self.scaling: dict[str, float] = {}
        # Slot buffers: adapter -> (key of the masters it was made from, A, B) in a compute
        # dtype other than the masters' (bf16 on GPU). Empty on an fp32 model.
        self._compute: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        # adapter -> how many times its buffer was released: part of the buffer's key, so a
        # copy made from weights read before a release is never taken for a current one.
        self._released: dict[str, int] = {}

    def add_adapter(self, adapter_id: str, rank: int, alpha: float, generator: torch.Generator) -> None:
        """Create A with PEFT's default init (Kaiming-uniform) and B = 0, so a new adapter
        leaves the base model's outputs unchanged."""
        device = self.base.weight.device
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A[adapter_id] = nn.Parameter(a.to(device))
        self.lora_B[adapter_id] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        self.scaling[adapter_id] = alpha / rank

    def remove_adapter(self, adapter_id: str) -> None:
        self.scaling.pop(adapter_id, None)
        self.lora_A.pop(adapter_id, None)
        self.lora_B.pop(adapter_id, None)
        self._compute.pop(adapter_id, None)
        self._released.pop(adapter_id, None)

    def release_compute_copy(self, adapter_id: str) -> None:
        """Drop the adapter's slot buffer: it left the device, or its weights changed in a
        way their version counters do not show (a fused AdamW step does not bump them)."""
        self._released[adapter_id] = self._released.get(adapter_id, 0) + 1
        self._compute.pop(adapter_id, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        targeted = [a for a in routing.adapters if a in self.lora_A] if routing is not None else []
        if not targeted:  # no routed adapter targets this layer: the base output, untouched
            return self.base(x)
        x_NI = x.reshape(-1, self.in_features)
        segments = routing.segments(x_NI.shape[0])  # the coverage check, here only
        routed = [segments[a] for a in targeted]
        scales = [self.scaling[a] for a in targeted]
        masters = [w for a in targeted for w in (self.lora_A[a], self.lora_B[a])]  # A_0, B_0, A_1, B_1, ...
        computes = [w for a in targeted for w in self._weights(a, x.dtype)]  # the same, in x's dtype
        out_NO = self.base(x_NI)  # (N, out)
        if torch.is_grad_enabled():
            out_NO = SegmentedLora.apply(routed, scales, computes, out_NO, x_NI, *masters)
        else:  # sampling: the same sums, without autograd's bookkeeping (210 layers a decode step)
            _add_segments(routed, scales, computes, out_NO, x_NI, keep_h=False)
        return out_NO.view(*x.shape[:-1], self.out_features)

    def _weights(self, adapter_id: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A (r, in) and B (out, r) in ``dtype``, without a copy when the
        masters already are in it (see the module docstring)."""
        a, b = self.lora_A[adapter_id], self.lora_B[adapter_id]
        if a.dtype == dtype:
            return a, b
        key = (self._released.get(adapter_id, 0), a._version, b._version, a.data_ptr(), b.data_ptr(), dtype)
        slot = self._compute.get(adapter_id)
        if slot is None or slot[0] != key:
            slot = (key, a.detach().to(dtype), b.detach().to(dtype))
            self._compute[adapter_id] = slot
        return slot[1], slot[2]


class SegmentedLora(torch.autograd.Function):
    """``y[S_i] += scale_i * (x[S_i] @ A_i^T) @ B_i^T`` for every segment i, in place on y,
    with a backward of its own: it keeps only x (a view, no copy; A's gradient needs it,
    though the frozen base layer alone would not keep it) and each
    h_i = scale_i * x[S_i] @ A_i^T (|S_i| x r_i), and writes each segment's gradients
    straight into their rows, where autograd's in-place updates of views would clone the
    whole (N, out) gradient once per segment.

    ``weights`` are the compute-dtype A_0 (r, in), B_0 (out, r), A_1, ... (the layer's slot
    buffers, or the masters themselves when the dtypes agree); ``masters`` are the fp32
    parameters they were made from: the inputs autograd differentiates, whose gradients
    come back in their own dtype. The slot buffers are held on ctx, not saved: they are
    replaced, never written in place, so the layer's cache keeps them alive and unchanged."""

    @staticmethod
    def forward(ctx, segments, scales, weights, y_NO, x_NI, *masters):
        hs = _add_segments(segments, scales, weights, y_NO, x_NI)
        ctx.mark_dirty(y_NO)
        ctx.segments, ctx.scales, ctx.weights = segments, scales, weights
        ctx.master_dtypes = [m.dtype for m in masters]
        ctx.save_for_backward(x_NI, *hs)
        return y_NO

    @staticmethod
    def backward(ctx, g_NO):
        x_NI, *hs = ctx.saved_tensors
        weights, dtypes = ctx.weights, ctx.master_dtypes
        wants_x = ctx.needs_input_grad[4]
        g_x_NI = torch.zeros_like(x_NI) if wants_x else None
        grads: list[torch.Tensor | None] = []
        for i, seg in enumerate(ctx.segments):
            a_RI, b_OR, h_SR = weights[2 * i], weights[2 * i + 1], hs[i]
            g_SO = _rows(g_NO, seg)
            g_h_SR = (g_SO @ b_OR) * ctx.scales[i]  # (S, r): the gradient of the unscaled x[S] @ A^T
            g_a = (g_h_SR.t() @ _rows(x_NI, seg)).to(dtypes[2 * i]) if ctx.needs_input_grad[5 + 2 * i] else None
            g_b = (g_SO.t() @ h_SR).to(dtypes[2 * i + 1]) if ctx.needs_input_grad[6 + 2 * i] else None
            grads += [g_a, g_b]  # (r, in), (out, r)
            if wants_x:
                if seg.contiguous:
                    g_x_NI[seg.start : seg.end].addmm_(g_h_SR, a_RI)
                else:
                    g_x_NI.index_add_(0, seg.index_S, g_h_SR @ a_RI)
        return None, None, None, g_NO, g_x_NI, *grads


def _add_segments(
    segments, scales, weights, y_NO: torch.Tensor, x_NI: torch.Tensor, keep_h: bool = True
) -> list[torch.Tensor]:
    """``y[S_i] += scale_i * (x[S_i] @ A_i^T) @ B_i^T`` in place, for every segment; returns
    each h_i = scale_i * x[S_i] @ A_i^T (|S_i|, r_i), which backward needs (``keep_h``; else
    the scale rides on the expand and nothing is returned: one op less per adapter)."""
    hs = []
    for i, seg in enumerate(segments):
        a_RI, b_OR = weights[2 * i], weights[2 * i + 1]
        h_SR = _rows(x_NI, seg) @ a_RI.t()  # shrink: (S, in) @ (in, r)
        scale = scales[i]
        if keep_h:
            h_SR.mul_(scale)  # scaled on the small side
            scale = 1.0
        if seg.contiguous:
            y_NO[seg.start : seg.end].addmm_(h_SR, b_OR.t(), alpha=scale)  # expand: += (S, r) @ (r, out)
        else:
            y_NO.index_add_(0, seg.index_S, h_SR @ b_OR.t(), alpha=scale)
        if keep_h:
            hs.append(h_SR)
    return hs


def _rows(t_NF: torch.Tensor, seg) -> torch.Tensor:
    """A segment's rows: a view when contiguous, else a gather."""
    return t_NF[seg.start : seg.end] if seg.contiguous else t_NF.index_select(0, seg.index_S)


def wrap_linear_layers(model: nn.Module, candidate_names: Sequence[str]) -> dict[str, MultiLoraLinear]:
    """Replace every linear layer (``nn.Linear`` or ``Conv1D``) whose last name is in
    ``candidate_names`` by a MultiLoraLinear; returns them keyed by module path."""
    wanted = set(candidate_names)
    found: list[tuple[nn.Module, str, str, nn.Module]] = []
    for path, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in wanted and is_lora_target(child):
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
