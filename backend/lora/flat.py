"""One adapter's trainable tensors as views into a few flat fp32 buffers.

An adapter has hundreds of small A/B tensors (two per adapted layer, more with MoE experts).
Stepped tensor by tensor, AdamW costs a kernel launch (or a loop iteration) per tensor; on
an accelerator that per-tensor overhead, not the bytes, dominates a small adapter's step.
So each trainable adapter keeps its tensors in flat buffers of P elements, and everything
the optimizer touches is a view into them:

    weights_P      p.data          for every parameter p (A, B, whatever the adapter registers)
    grads_P        p.grad          bound when a pass first leaves a gradient
    exp_avg_P      state[p]["exp_avg"]      (the adapter's torch AdamW state: the checkpoint
    exp_avg_sq_P   state[p]["exp_avg_sq"]    format stays torch's state_dict)
    steps_S        state[p]["step"]         S = number of parameters, 0-dim views

A step of N adapters then runs over N flat tensors: one fused AdamW launch for all of them
(per set of hyperparameters), one norm for all their gradients, whatever their tensor counts.

The views are the same ``nn.Parameter`` objects everyone else holds (layers, optimizer,
checkpoint code); only their storage changes. Whoever replaces a tensor (a checkpoint load
swapping in new moments, a gradient assigned from outside, a parameter given new ``.data``)
is noticed by ``ready_for_step`` and its values are copied back into the buffers, so the flat
layout is an optimisation that never changes results. ``move`` moves the buffers (residency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> the FlatBuffers holding it


def owner_of(p: torch.Tensor) -> FlatBuffers | None:
    """The flat buffers ``p`` is a view into (None: a parameter on its own)."""
    return _OWNER.get(p)


class FlatBuffers:
    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.weights_P = _flat_of([p.detach() for p in self.params])
        self.grads_P: torch.Tensor | None = None
        self.exp_avg_P: torch.Tensor | None = None
        self.exp_avg_sq_P: torch.Tensor | None = None
        self.steps_S: torch.Tensor | None = None
        self.step0: torch.Tensor | None = None  # steps_S[0], made once (each indexing is an op)
        self.steps_uniform = True  # every parameter's AdamW step counter equal (else: per tensor)
        self._state: dict | None = None  # the optimizer.state the moments are bound into
        self._bind_weights()
        for p in self.params:
            _OWNER[p] = self

    @classmethod
    def adopt(cls, params: Sequence[nn.Parameter]) -> FlatBuffers | None:
        """Flat buffers for ``params`` (their values copied in, then viewed); None where they
        cannot share one buffer (none, or mixed devices or dtypes)."""
        if not params or len({(p.device, p.dtype) for p in params}) > 1:
            return None
        return cls(params)

    @property
    def device(self) -> torch.device:
        return self.weights_P.device

    # ---- views --------------------------------------------------------------------------------

    def _views(self, flat_P: torch.Tensor) -> list[torch.Tensor]:
        return [view.view(shape) for view, shape in zip(flat_P.split(self.numels), self.shapes, strict=True)]

    def _bound(self, tensors: Sequence[torch.Tensor | None], flat_P: torch.Tensor | None) -> bool:
        """Whether ``tensors`` are exactly the views of ``flat_P`` (pointer checks, no op)."""
        if flat_P is None or any(t is None for t in tensors):
            return False
        base, size = flat_P.data_ptr(), flat_P.element_size()
        return all(t.data_ptr() == base + o * size for t, o in zip(tensors, self.offsets, strict=True))

    def _bind_weights(self) -> None:
        for p, view in zip(self.params, self._views(self.weights_P), strict=True):
            p.data = view

    def _bind_grads(self) -> None:
        for p, view in zip(self.params, self._views(self.grads_P), strict=True):
            p.grad = view

    def _check_weights(self) -> None:
        """Rebind if some parameter was given new storage (its values are the truth then)."""
        if not self._bound(self.params, self.weights_P):  # (p.data would dispatch a detach per tensor)
            with torch.no_grad():
                self.weights_P = _flat_of([p.detach() for p in self.params])
            self._bind_weights()

    # ---- gradients ----------------------------------------------------------------------------

    @torch.no_grad()
    def take_gradients(self, grads: Sequence[torch.Tensor | None]) -> None:
        """A pass's fresh gradients for parameters that had none: copied into the flat buffer
        and bound (parameters that already hold a gradient are the caller's to add to)."""
        fresh = [i for i, (p, g) in enumerate(zip(self.params, grads, strict=True)) if g is not None and p.grad is None]
        if not fresh:
            return
        if self.grads_P is None or self.grads_P.device != self.device:
            self.grads_P = torch.zeros_like(self.weights_P)
        views = self._views(self.grads_P)
        torch._foreach_copy_([views[i] for i in fresh], [grads[i] for i in fresh])
        for i in fresh:
            self.params[i].grad = views[i]

    def flat_gradient(self) -> torch.Tensor | None:
        """(P,) every gradient, when every parameter has one, bound in the buffer (those that
        were assigned from elsewhere are copied in first); None where some have none: a step
        then leaves those alone, as torch's AdamW does, which a flat step cannot."""
        self._check_weights()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        if not self._bound(grads, self.grads_P):
            with torch.no_grad():
                self.grads_P = _flat_of(grads)
            self._bind_grads()
        return self.grads_P

    # ---- optimizer state ----------------------------------------------------------------------

    @torch.no_grad()
    def bind_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer``'s AdamW state of every parameter views into the flat moments:
        zeros where there is none yet (AdamW's first step), the values where a checkpoint
        load put new tensors. Cheap when already bound (the same state dict, all present)."""
        state = optimizer.state
        if state is self._state and len(state) == len(self.params):
            return
        present = [p in state and "exp_avg" in state[p] for p in self.params]
        self.exp_avg_P = torch.zeros_like(self.weights_P)
        self.exp_avg_sq_P = torch.zeros_like(self.weights_P)
        steps = [state[p]["step"].reshape(()).float().to(self.device) if there else torch.zeros((), device=self.device)
                 for p, there in zip(self.params, present, strict=True)]  # fmt: skip
        m_views, v_views = self._views(self.exp_avg_P), self._views(self.exp_avg_sq_P)
        loaded = [i for i, there in enumerate(present) if there]
        if loaded:  # a checkpoint's (or a partial) state: its values
            torch._foreach_copy_([m_views[i] for i in loaded], [state[self.params[i]]["exp_avg"] for i in loaded])
            torch._foreach_copy_([v_views[i] for i in loaded], [state[self.params[i]]["exp_avg_sq"] for i in loaded])
        self._set_steps(torch.stack(steps))
        for i, p in enumerate(self.params):
            state[p] = {"step": self.steps_S[i], "exp_avg": m_views[i], "exp_avg_sq": v_views[i]}
        self._state = state

    def _set_steps(self, steps_S: torch.Tensor) -> None:
        self.steps_S = steps_S
        self.step0 = steps_S[0]
        self.steps_uniform = bool((steps_S == steps_S[0]).all())

    # ---- placement ----------------------------------------------------------------------------

    @torch.no_grad()
    def move(self, device: torch.device, optimizer: torch.optim.Optimizer | None, pin: bool = False) -> None:
        """Move every buffer to ``device`` (residency) and rebind the views (the optimizer's
        state too, when it is bound here)."""

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device)
            return t.pin_memory() if pin else t

        self._check_weights()
        grads = [p.grad for p in self.params]
        grads_bound = self._bound(grads, self.grads_P)
        self.weights_P = moved(self.weights_P)
        self._bind_weights()
        if grads_bound:
            self.grads_P = moved(self.grads_P)
            self._bind_grads()
        else:  # gradients held elsewhere (or some none): each moves on its own
            self.grads_P = None
            for p, g in zip(self.params, grads, strict=True):
                p.grad = moved(g)
        state_bound = optimizer is not None and optimizer.state is self._state and len(self._state) == len(self.params)
        self.exp_avg_P, self.exp_avg_sq_P = moved(self.exp_avg_P), moved(self.exp_avg_sq_P)
        if self.steps_S is not None:
            self._set_steps(moved(self.steps_S))
        if state_bound:
            m_views, v_views = self._views(self.exp_avg_P), self._views(self.exp_avg_sq_P)
            for i, p in enumerate(self.params):
                optimizer.state[p] = {"step": self.steps_S[i], "exp_avg": m_views[i], "exp_avg_sq": v_views[i]}
        elif optimizer is not None:  # not bound here: each state tensor moves on its own
            self._state = None
            for entry in optimizer.state.values():
                for key, value in entry.items():
                    if torch.is_tensor(value):
                        entry[key] = moved(value)


def _flat_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(P,) the tensors' values end to end, in one new buffer on their device."""
    return torch.cat([t.reshape(-1) for t in tensors])
