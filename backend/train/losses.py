"""The loss functions a forward_backward can ask for, defined as Tinker defines them.

Each is elementwise over token positions and SUMMED (Tinker's convention: nothing is
divided by a token or sequence count; the seed API's ``/fwdbwd`` divides afterwards).
With ℓ the learner's log-probability of the target token, q the sampler's (input
``logprobs``), A the advantage and r = exp(ℓ - q):

- cross_entropy        -w·ℓ              (targets and weights may be (T, K): top-K distillation)
- importance_sampling  -r·A
- ppo                  -min(r·A, clip(r, lo, hi)·A)
- cispo                -sg(clip(r, lo, hi))·ℓ·A
- dro                  -(ℓ·A - β/2·(ℓ - q)²)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from thinker.core.errors import BadRequestError, clip

# Losses of the seed API's /fwdbwd: its chat examples carry targets and weights only (the
# RL losses below need sampler logprobs and advantages: Tinker API).
CHAT_LOSS_FUNCTIONS = ("cross_entropy",)

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossFunction:
    inputs: tuple[str, ...]  # loss_fn_inputs besides target_tokens, all required
    config: Mapping[str, float]  # loss_fn_config keys and their defaults
    # (ℓ, inputs, config) -> elementwise loss, all of ℓ's shape (rows, T) or (rows, T, K)
    elementwise: Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], Tensor]


def _ratio(logprobs: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    return torch.exp(logprobs - inputs["logprobs"])


def _cross_entropy(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    return -lp * inputs["weights"]


def _importance_sampling(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    return -_ratio(lp, inputs) * inputs["advantages"]


def _ppo(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    ratio, advantages = _ratio(lp, inputs), inputs["advantages"]
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _cispo(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    clipped = _ratio(lp, inputs).clamp(config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -clipped * lp * inputs["advantages"]


def _dro(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * (lp - inputs["logprobs"]) ** 2)


_RL_INPUTS = ("logprobs", "advantages")
LOSS_FUNCTIONS: dict[str, LossFunction] = {
    "cross_entropy": LossFunction(("weights",), {}, _cross_entropy),
    "importance_sampling": LossFunction(_RL_INPUTS, {}, _importance_sampling),
    "ppo": LossFunction(_RL_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _ppo),
    # The hosted service's current default is a one-sided clip (older docs said 0.8/1.2).
    "cispo": LossFunction(_RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, _cispo),
    # Tinker's docs show beta=0.05 in every example and document no default; we use it.
    "dro": LossFunction(_RL_INPUTS, {"beta": 0.05}, _dro),
}


def loss_config(loss_fn: str, given: Mapping[str, object] | None) -> dict[str, float]:
    """The loss's config: its defaults overridden by ``given``; unknown keys are refused."""
    spec = get_loss_function(loss_fn)
    config = dict(spec.config)
    for key, value in (given or {}).items():
        if key not in spec.config:
            known = sorted(spec.config) or "none"
            raise BadRequestError(f"loss_fn_config.{clip(key)}: {loss_fn} takes no such setting; it takes: {known}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadRequestError(f"loss_fn_config.{key}: must be a number (finite), got {clip(repr(value))}")
        config[key] = float(value)
    if config.get("clip_low_threshold", 0.0) > config.get("clip_high_threshold", math.inf):
        raise BadRequestError(
            f"loss_fn_config: clip_low_threshold {config['clip_low_threshold']} is above "
            f"clip_high_threshold {config['clip_high_threshold']}"
        )
    return config


def get_loss_function(loss_fn: str) -> LossFunction:
    spec = LOSS_FUNCTIONS.get(loss_fn)
    if spec is None:
        allowed = sorted(LOSS_FUNCTIONS)
        raise BadRequestError(f"loss_fn: {clip(repr(loss_fn))} is not supported here; allowed: {allowed}")
    return spec
