"""Per-expert LoRA on fused MoE expert weights (transformers 5's 3-D expert parameters).

In transformers 5 an MoE layer's experts are one module holding fused 3-D parameters:
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) (GPT-OSS stores them transposed,
(E, in, out), and adds biases), not ``nn.Linear`` layers. Each such weight gets an
``ExpertLora``: per adapter and per expert e, A_e (r, in) and B_e (out, r), held as one
(E, r, in) and one (E, out, r) parameter, with the semantics PEFT's ``target_parameters``
gives them (peft 0.21 ``ParamWrapper``: W_e + scale * B_e @ A_e, in the weight's (out, in)
sense, whatever its storage layout):

    y_p = x_p @ W_e^T [+ bias_e] + scale_i * (x_p @ A_{i,e}^T) @ B_{i,e}^T

for every (token, top-k slot) pair p routed to expert e whose token belongs to adapter i
(tokens on the base model, or on an adapter not targeting this weight, get the first term
only). ``wrap_experts`` replaces each experts module's ``forward`` (an instance attribute;
the class, its parameters and their paths stay as they are, so exports name what peft
finds). With no routed adapter targeting the module, the original forward runs untouched
(whatever ``experts_implementation`` the model was loaded with). Otherwise
``_LoraExpertsForward`` computes grouped like transformers' grouped_mm implementation: the
pairs are sorted by (expert, adapter slot), the base projection is one
``torch.nn.functional.grouped_mm`` over expert segments, and each adapter's branch is two
grouped_mm calls over that adapter's pairs (still sorted by expert) reading its (E, r, in)
and (E, out, r) parameters directly: each (adapter, expert) weight read once, no per-token
weight copies; activations are gathered (as any MoE does), weights never are. grouped_mm
needs 16-byte-aligned rows (rank >= 4 in fp32, >= 8 in bf16); other shapes fall back to one
matmul per hit expert, with the same results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.lora.routing import current_routing

# The fused weights wrapped, in the order experts modules register them (peft nests its
# wrappers in that order, which the export's key names follow: see peft_files.py).
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 experts module this file can put LoRA on: one made by
    ``use_experts_implementation`` (whose implementations, eager and grouped_mm alike, all
    compute what ``_LoraExpertsForward`` does: that decorator sets ``is_transposed``), with
    fused 3-D gate_up_proj and down_proj, a gate, and no norm after the experts."""
    weights = [getattr(module, name, None) for name in EXPERT_WEIGHTS]
    order = [name for name, _ in module.named_parameters(recurse=False) if name in EXPERT_WEIGHTS]
    return (
        all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights)
        and order == list(EXPERT_WEIGHTS)  # the order the export's nesting assumes
        and hasattr(module, "is_transposed")
        and getattr(module, "has_gate", False)
        and not getattr(module, "has_post_expert_norm", False)
        and callable(getattr(module, "_apply_gate", None))
    )


class ExpertLora:
    """One fused expert weight plus every adapter's per-expert A/B. The adapter interface
    (``lora_A``/``lora_B``/``scaling`` dicts, ``add_adapter``, ``remove_adapter``,
    ``release_compute_copy``) is MultiLoraLinear's, so the registry, optimizer,
    checkpoints, residency and snapshots treat both alike."""

    def __init__(self, experts: nn.Module, param_name: str, module_path: str) -> None:
        weight = getattr(experts, param_name)
        self.experts = experts
        self.param_name = param_name  # gate_up_proj or down_proj
        self.module_path = module_path  # e.g. model.layers.1.mlp.experts
        self.name = f"{module_path}.{param_name}"
        self.transposed = bool(getattr(experts, "is_transposed", False))  # stored (E, in, out)
        E, d1, d2 = weight.shape
        self.num_experts = int(E)
        self.in_features, self.out_features = (int(d1), int(d2)) if self.transposed else (int(d2), int(d1))
        self.fan_in_fan_out = False  # (read by the export, as on MultiLoraLinear)
        self.lora_A: dict[str, nn.Parameter] = {}  # adapter -> (E, r, in)
        self.lora_B: dict[str, nn.Parameter] = {}  # adapter -> (E, out, r)
        self.scaling: dict[str, float] = {}
        # Slot buffers as on MultiLoraLinear: adapter -> (key of the masters, A, B) in a compute
        # dtype other than the masters' (bf16 on GPU), and how often each was released.
        self._compute: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._released: dict[str, int] = {}

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.param_name)

    def add_adapter(self, adapter_id: str, rank: int, alpha: float, generator: torch.Generator) -> None:
        """A with PEFT's init for this weight (Kaiming-uniform over its (E*r, in) lora_A, whose
        bound depends on ``in`` alone) and B = 0: a new adapter changes nothing."""
        device = self.weight.device
        a = torch.empty(self.num_experts * rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A[adapter_id] = nn.Parameter(a.view(self.num_experts, rank, self.in_features).to(device))
        self.lora_B[adapter_id] = nn.Parameter(
            torch.zeros(self.num_experts, self.out_features, rank, dtype=torch.float32, device=device)
        )
        self.scaling[adapter_id] = alpha / rank

    def remove_adapter(self, adapter_id: str) -> None:
        for held in (self.scaling, self.lora_A, self.lora_B, self._compute, self._released):
            held.pop(adapter_id, None)

    def release_compute_copy(self, adapter_id: str) -> None:
        """Drop the adapter's slot buffer (it stepped, or left the device): see MultiLoraLinear."""
        self._released[adapter_id] = self._released.get(adapter_id, 0) + 1
        self._compute.pop(adapter_id, None)

    def weights(self, adapter_id: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (E, in, r) and B as (E, r, out) in ``dtype``: views of the fp32 masters, or of
        their slot buffer on a model of another dtype, through which gradients still reach
        the masters (``_ToMaster``)."""
        a, b = self.lora_A[adapter_id], self.lora_B[adapter_id]
        if a.dtype != dtype:
            key = (self._released.get(adapter_id, 0), a._version, b._version, a.data_ptr(), b.data_ptr(), dtype)
            slot = self._compute.get(adapter_id)
            if slot is None or slot[0] != key:
                slot = (key, a.detach().to(dtype), b.detach().to(dtype))
                self._compute[adapter_id] = slot
            if torch.is_grad_enabled() and a.requires_grad:
                a, b = _ToMaster.apply(a, slot[1]), _ToMaster.apply(b, slot[2])
            else:
                a, b = slot[1], slot[2]
        return a.transpose(1, 2), b.transpose(1, 2)

    def base_weight_EIO(self) -> torch.Tensor:
        """The base weight as (E, in, out): a view."""
        w = self.weight
        return w if self.transposed else w.transpose(1, 2)


class _ToMaster(torch.autograd.Function):
    """The slot buffer forward, its gradient to the fp32 master (cast back) backward."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, compute: torch.Tensor) -> torch.Tensor:
        ctx.master_dtype = master.dtype
        return compute.view_as(compute)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.master_dtype), None


def wrap_experts(model: nn.Module) -> dict[str, ExpertLora]:
    """Give every fused experts module of ``model`` LoRA on its expert weights; returns the
    ``ExpertLora`` of each weight keyed by parameter path (model.layers.1.mlp.experts.down_proj)."""
    found: dict[str, ExpertLora] = {}
    for path, module in model.named_modules():
        if is_fused_experts(module) and not isinstance(module.__dict__.get("forward"), _LoraExpertsForward):
            gate_up, down = (ExpertLora(module, name, path) for name in EXPERT_WEIGHTS)
            module.forward = _LoraExpertsForward(module, gate_up, down)
            found[gate_up.name], found[down.name] = gate_up, down
    return found


class _LoraExpertsForward:
    """The experts module's forward with every routed adapter's per-expert LoRA."""

    def __init__(self, experts: nn.Module, gate_up: ExpertLora, down: ExpertLora) -> None:
        self.experts, self.gate_up, self.down = experts, gate_up, down
        self.original = type(experts).forward  # the class's (dispatching) forward

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        hidden_NH, index_NK, weights_NK = _arguments(args, kwargs)
        routing = current_routing()
        lora = (self.gate_up.lora_A, self.down.lora_A)
        adapters = [a for a in routing.adapters if any(a in d for d in lora)] if routing is not None else []
        if not adapters:  # no routed adapter targets these experts: the model's own forward
            return self.original(self.experts, *args, **kwargs)
        experts, E = self.experts, self.gate_up.num_experts
        N, K = index_NK.shape
        segments = routing.segments(N)  # raises when the routing cannot cover N tokens
        slot_N = torch.zeros(N, dtype=torch.long, device=hidden_NH.device)  # 0: no adapter here
        for i, adapter in enumerate(adapters, start=1):
            slot_N[segments[adapter].index_S] = i

        # The (token, top-k slot) pairs P = N*K, sorted by (expert, adapter slot); stable, so
        # within a group pairs keep token order (the eager loop's order).
        expert_P = index_NK.reshape(-1)
        token_P = torch.arange(N, device=hidden_NH.device).repeat_interleave(K)
        keep_P = expert_P < E  # expert-parallel sentinels (index E) are no pair at all
        order_P = torch.argsort(expert_P * (len(adapters) + 1) + slot_N[token_P], stable=True)
        order_P = order_P[keep_P[order_P]]
        expert_P, token_P = expert_P[order_P], token_P[order_P]
        slot_P, weight_P = slot_N[token_P], weights_NK.reshape(-1)[order_P]
        counts_E = torch.bincount(expert_P, minlength=E)

        # Each adapter's pairs (still sorted by expert) and its pairs per expert, shared by
        # both projections.
        groups = []
        for i, adapter in enumerate(adapters, start=1):
            rows_S = (slot_P == i).nonzero().squeeze(1)
            if rows_S.numel():
                groups.append((adapter, rows_S, torch.bincount(expert_P[rows_S], minlength=E)))

        x_PH = hidden_NH[token_P]
        has_bias = getattr(experts, "has_bias", False)
        bias = experts.gate_up_proj_bias if has_bias else None
        up_PO = _project(self.gate_up, x_PH, counts_E, expert_P, bias, groups)
        inner_PI = experts._apply_gate(up_PO)
        bias = experts.down_proj_bias if has_bias else None
        out_PH = _project(self.down, inner_PI, counts_E, expert_P, bias, groups)
        out_PH = out_PH * weight_P[:, None]
        return _IndexAdd.apply(torch.zeros_like(hidden_NH), token_P, out_PH.to(hidden_NH.dtype))


def _project(
    weight: ExpertLora,
    x_PI: torch.Tensor,
    counts_E: torch.Tensor,
    expert_P: torch.Tensor,
    bias_EO: torch.Tensor | None,
    groups: list[tuple[str, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """y_P = x_P @ W_e^T + bias_e for pairs sorted by expert, plus each adapter's branch on
    its own pairs: ``groups`` holds (adapter, its pair rows (S,), its pairs per expert (E,))."""
    y_PO = grouped_linear(x_PI, weight.base_weight_EIO(), counts_E)
    if bias_EO is not None:
        y_PO = y_PO + bias_EO[expert_P]
    for adapter, rows_S, counts in groups:
        if adapter not in weight.lora_A:
            continue
        a_EIR, b_ERO = weight.weights(adapter, x_PI.dtype)
        h_SR = grouped_linear(x_PI[rows_S], a_EIR, counts) * weight.scaling[adapter]  # shrink
        y_PO = _IndexAdd.apply(y_PO, rows_S, grouped_linear(h_SR, b_ERO, counts))  # expand
    return y_PO


class _IndexAdd(torch.autograd.Function):
    """``y.index_add_(0, index, src)`` in place, whose backward keeps only ``index``: torch's
    own index_add keeps all of ``src`` (an (S, out) tensor per call) for its gradient's shape."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.mark_dirty(y)
        return y.index_add_(0, index, src)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (index,) = ctx.saved_tensors
        return g, None, g.index_select(0, index) if ctx.needs_input_grad[2] else None


def grouped_linear(x_SK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[s_e:s_{e+1}] = x[s_e:s_{e+1}] @ w[e]`` for rows sorted by expert, ``counts_E`` rows
    each: one grouped_mm where its kernels take the shapes, else a matmul per hit expert."""
    if _groupable(x_SK, w_EKN):
        return F.grouped_mm(x_SK, w_EKN, offs=torch.cumsum(counts_E, 0, dtype=torch.int32))
    pieces, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            pieces.append(x_SK[start : start + n] @ w_EKN[e])
            start += n
    return torch.cat(pieces) if pieces else x_SK.new_zeros(0, w_EKN.shape[-1])


def _groupable(x_SK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """grouped_mm's kernels want every row 16-byte aligned; on CUDA, bf16 on SM80 or later
    (what transformers' own grouped_mm path asks too)."""
    if not hasattr(F, "grouped_mm") or x_SK.shape[0] == 0 or x_SK.dtype != w_EKN.dtype:
        return False
    if x_SK.device.type == "cuda":
        if x_SK.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_SK.device) < (8, 0):
            return False
    elif x_SK.device.type != "cpu":
        return False
    size = x_SK.element_size()
    return all(d * size % 16 == 0 for d in (w_EKN.shape[1], w_EKN.shape[2]))


def _arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (N, H), top_k_index (N, K), top_k_weights (N, K)), however the model passed them
    (GPT-OSS names the last two router_indices and routing_weights)."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    values = list(args)
    for aliases in names[len(values) :]:
        values.append(next(kwargs[n] for n in aliases if n in kwargs))
    return values[0], values[1], values[2]
