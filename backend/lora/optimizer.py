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

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from backend.lora.adapters import Adapter
from thinker.core.errors import BadRequestError


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


def adamw_steps(steps: Sequence[tuple[Adapter, AdamParams]]) -> list[float | BadRequestError]:
    """Step each (distinct, trainable) adapter and drop its gradients: its gradient norm, or
    the error that refused its step (a non-finite gradient: nothing moves, the gradients go).
    Clipping is each adapter's own (``grad_clip_norm``); one device sync for all the norms."""
    grads = [gradient_tensors(adapter) for adapter, _ in steps]
    norms_N = gradient_norms(grads)
    values = norms_N.tolist() if steps else []
    outcomes: list[float | BadRequestError] = []
    stepping, clipped = [], []
    for n, ((adapter, adam), value) in enumerate(zip(steps, values, strict=True)):
        if math.isfinite(value):
            stepping.append((adapter, adam))
            if adam.grad_clip_norm > 0:
                clipped.append((n, adam.grad_clip_norm))
            outcomes.append(value)
        else:
            # What the client sent overflowed (huge advantages or weights): a user error.
            outcomes.append(BadRequestError(
                f"the accumulated gradient of {adapter.id} is not finite (norm {value}); the step was "
                "refused and the gradients were discarded. Scale the loss inputs down"
            ))  # fmt: skip
    if clipped:
        clip_gradients([grads[n] for n, _ in clipped], norms_N, [n for n, _ in clipped], [m for _, m in clipped])
    fused_adamw_step(stepping)
    for adapter, _ in steps:
        for p in adapter.params:
            p.grad = None
    return outcomes


def gradient_tensors(adapter: Adapter) -> list[torch.Tensor]:
    """The adapter's gradients as the optimizer reads them: its one flat buffer when every
    parameter has a gradient (backend/lora/flat.py), else each parameter's that has one."""
    if adapter.flat is not None:
        flat_P = adapter.flat.flat_gradient()
        if flat_P is not None:
            return [flat_P]
    return [p.grad for p in adapter.params if p.grad is not None]


def grads_of(adapter: Adapter) -> list[torch.Tensor]:
    return [p.grad for p in adapter.params if p.grad is not None]


def gradient_norms(per_adapter: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """(N,) each adapter's total L2 gradient norm (0 without gradients): the norm of its
    tensors' norms, as ``torch.nn.utils.get_total_norm`` computes it, with one
    ``_foreach_norm`` over every adapter's gradients (one flat tensor each, mostly)."""
    flat = [g for grads in per_adapter for g in grads]
    if not flat:
        return torch.zeros(len(per_adapter))
    if len(_group_tensors_by_device_and_dtype([flat])) > 1:  # mixed placement: no shared launch
        return torch.stack([
            torch.nn.utils.get_total_norm(grads).float().cpu() if grads else torch.zeros(()) for grads in per_adapter
        ])  # fmt: skip
    norms_G = torch.stack(torch._foreach_norm(flat, 2.0)).float()  # G: every gradient tensor of every adapter
    if all(len(grads) == 1 for grads in per_adapter):
        return norms_G  # one tensor per adapter: its norm is the adapter's
    norms = []
    start = 0
    for grads in per_adapter:
        # the slice holds what get_total_norm stacks for this adapter alone: the same numbers
        norms.append(torch.linalg.vector_norm(norms_G[start : start + len(grads)], 2.0))
        start += len(grads)
    return torch.stack(norms)


@torch.no_grad()
def clip_gradients(
    grads: Sequence[Sequence[torch.Tensor]], norms_N: torch.Tensor, rows: Sequence[int], max_norms: Sequence[float]
) -> None:
    """Scale each adapter's gradients ``grads[i]`` (norm ``norms_N[rows[i]]``) to at most its
    ``max_norms[i]`` (> 0), exactly as ``torch.nn.utils.clip_grads_with_norm_`` would:
    coefficient min(1, max / (norm + 1e-6)). One multiply for all of them."""
    device = norms_N.device
    index_C = torch.tensor(list(rows), device=device)
    maxima_C = torch.tensor(list(max_norms), dtype=norms_N.dtype, device=device)
    coefficients = torch.clamp(maxima_C / (norms_N[index_C] + 1e-6), max=1.0).unbind()  # (C,) 0-dim each
    tensors = [g for adapter_grads in grads for g in adapter_grads]
    factors = [c for adapter_grads, c in zip(grads, coefficients, strict=True) for _ in adapter_grads]
    if tensors:
        torch._foreach_mul_(tensors, [f.to(t.device, t.dtype) for f, t in zip(factors, tensors, strict=True)])


@torch.no_grad()
def fused_adamw_step(steps: Sequence[tuple[Adapter, AdamParams]]) -> None:
    """One AdamW step for each (distinct) adapter, on the parameters that have a gradient:
    one kernel launch per (hyperparameters, device, dtype) for all of them together, over
    each adapter's flat buffers when every parameter has a gradient (else its tensors).
    Gradients are left in place (the caller drops them)."""
    groups: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], [], [], []])
    counters: list[torch.Tensor] = []  # every AdamW step counter to advance (flat: the whole buffer)
    for adapter, adam in steps:
        optimizer = adapter.optimizer
        if optimizer is None:
            raise ValueError(f"adapter {adapter.id!r} is frozen: it has no optimizer to step")
        for group in optimizer.param_groups:
            # Kept current so optimizer.pt records the last step's hyperparameters, as before.
            group.update(
                lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
            )
        params, grads, exp_avgs, exp_avg_sqs, state_steps = groups[adam.kernel_key]
        flat = adapter.flat
        if flat is not None:
            flat.bind_state(optimizer)
            grads_P = flat.flat_gradient()
            if grads_P is not None and flat.steps_uniform:
                params.append(flat.weights_P)
                grads.append(grads_P)
                exp_avgs.append(flat.exp_avg_P)
                exp_avg_sqs.append(flat.exp_avg_sq_P)
                state_steps.append(flat.step0)
                counters.append(flat.steps_S)
                continue
            flat.steps_uniform = False  # some counters advance below, others not
        for p in adapter.params:
            grad = p.grad
            if grad is None:
                continue  # as torch's AdamW: no gradient, no step (its counter stays)
            state = optimizer.state[p] or _new_state(optimizer, p)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            counters.append(state["step"])
    if counters:
        torch._foreach_add_(counters, 1)
    for (lr, beta1, beta2, eps, weight_decay), tensors in groups.items():
        if not tensors[0]:
            continue  # none of these adapters has a gradient
        for (params, grads, m, v, state_steps), _ in _group_tensors_by_device_and_dtype(tensors).values():
            torch._fused_adamw_(
                params, grads, m, v, [], state_steps,
                amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                maximize=False, grad_scale=None, found_inf=None,
            )  # fmt: skip


def _new_state(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    """``p``'s AdamW state as ``AdamW(fused=True)`` makes it on first use: a float32 step
    counter on the parameter's device and zero moments. (A loaded state_dict gets its
    counters moved beside the parameters by the fused optimizer's load_state_dict.)"""
    state = optimizer.state[p]
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state
