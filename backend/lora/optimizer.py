"""AdamW over many adapters at once: one fused multi-tensor step for every adapter that steps.

Each trainable adapter keeps its moments in its own ``torch.optim.AdamW`` (``adapter.optimizer``):
its state is keyed by the adapter's own parameters, residency moves it with the adapter, and a
checkpoint saves its ``state_dict()`` as ``optimizer.pt``, as it always has. What changes is who
steps it: a batch of optim_steps does not loop over those optimizers; the tensors of every adapter
stepping with the same hyperparameters go through ONE call of ``torch._fused_adamw_``, the kernel
``AdamW(fused=True)`` runs for a single adapter. Bias correction stays per adapter: every
parameter carries its own step counter (``state["step"]``) and the kernel reads each one, so
adapters at different steps share a launch. The result equals stepping each adapter's own
AdamW (the same kernel on the same numbers).

Gradient norms (reported, checked for overflow, used for clipping) are likewise computed for all
adapters with one ``_foreach_norm`` and read back with one device sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from backend.lora.adapters import Adapter


@dataclass(frozen=True)
class AdamParams:
    """One optim_step's hyperparameters (Tinker's AdamParams)."""

    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW)
    grad_clip_norm: float = 0.0  # <= 0: no clipping

    @property
    def kernel_key(self) -> tuple[float, float, float, float, float]:
        """What the fused kernel takes as scalars: adapters that agree on it step in one launch."""
        return (self.learning_rate, self.beta1, self.beta2, self.eps, self.weight_decay)


def grads_of(adapter: Adapter) -> list[torch.Tensor]:
    return [p.grad for p in adapter.params if p.grad is not None]


def gradient_norms(adapters: Sequence[Adapter]) -> list[torch.Tensor]:
    """Each adapter's total L2 gradient norm as a 0-dim tensor (0 without gradients), computed
    as ``torch.nn.utils.get_total_norm`` does (the same per-tensor norms, then the norm of
    those), but with one ``_foreach_norm`` over every adapter's gradients."""
    per_adapter = [grads_of(a) for a in adapters]
    flat = [g for grads in per_adapter for g in grads]
    if not flat:
        return [torch.zeros(()) for _ in adapters]
    if len({(g.device, g.dtype) for g in flat}) > 1:  # mixed placement: no shared launch
        return [torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(()) for grads in per_adapter]
    tensor_norms = torch._foreach_norm(flat, 2.0)
    norms, start = [], 0
    for grads in per_adapter:
        if not grads:
            norms.append(torch.zeros((), device=flat[0].device))
            continue
        norms.append(torch.linalg.vector_norm(torch.stack(tensor_norms[start : start + len(grads)]), 2.0))
        start += len(grads)
    return norms


@torch.no_grad()
def clip_gradients(adapters: Sequence[Adapter], norms: Sequence[torch.Tensor], max_norms: Sequence[float]) -> None:
    """Scale each adapter's gradients to at most its ``max_norm`` (> 0), exactly as
    ``torch.nn.utils.clip_grads_with_norm_`` would: coefficient min(1, max / (norm + 1e-6))."""
    for adapter, norm, max_norm in zip(adapters, norms, max_norms, strict=True):
        grads = grads_of(adapter)
        if grads:
            coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))


@torch.no_grad()
def fused_adamw_step(steps: Sequence[tuple[Adapter, AdamParams]]) -> None:
    """One AdamW step for each (distinct) adapter, on the parameters that have a gradient:
    one kernel launch per (hyperparameters, device, dtype) for all of them together.
    Gradients are left in place (the caller drops them)."""
    groups: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], [], [], []])
    for adapter, adam in steps:
        optimizer = adapter.optimizer
        if optimizer is None:
            raise ValueError(f"adapter {adapter.id!r} is frozen: it has no optimizer to step")
        for group in optimizer.param_groups:
            # Kept current so optimizer.pt records the last step's hyperparameters, as before.
            group.update(
                lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
            )
        for p in adapter.params:
            if p.grad is None:
                continue  # as torch's AdamW: no gradient, no step (its counter stays)
            state = _state_for(optimizer, p)
            params, grads, exp_avgs, exp_avg_sqs, state_steps = groups[(adam.kernel_key, p.device, p.dtype)]
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
    for ((lr, beta1, beta2, eps, weight_decay), _, _), (params, grads, m, v, state_steps) in groups.items():
        torch._foreach_add_(state_steps, 1)
        torch._fused_adamw_(
            params, grads, m, v, [], state_steps,
            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip


def _state_for(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    """``p``'s AdamW state, made as ``AdamW(fused=True)`` makes it on first use: a float32
    step counter on the parameter's device and zero moments."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif state["step"].device != p.device:  # a counter kept on the CPU (an unfused optimizer's state)
        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    return state
