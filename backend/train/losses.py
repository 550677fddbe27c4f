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
- gspo                 -min(s_t·A, clip(s_t, lo, hi)·A), s_t = sg(s)·exp(ℓ - sg(ℓ)), s the row's
                       sequence ratio exp(mean over sequence_ratio_mask of (sg(ℓ) - q))
- stable_reinforce     m·(-sg(min(ρ, 1))·ℓ·A + κ/2·(ℓ - q)²), ρ = exp(ℓ - q), with q the logprob
                       the sampler RECORDED for the token (not one the client sends) and m the
                       positions that name a recorded sampled token (stability_mask)

gspo is Tinker's GSPO-token, as its docs give it. For stable_reinforce Tinker documents the
interface (sampling with record_stability_info, provenance spans naming sequence_ids) but not
the formula: ours is REINFORCE with the importance weight truncated at 1 and detached, which
is plain REINFORCE on policy and shrinks the step on tokens the learner has already moved
away from (off-policy or mismatched numerics), plus an optional pull towards the sampler
(kl_coeff, 0 by default). thinker/http/tinker/provenance.py fills q and m from the recorded
sequences; rows are datums, so gspo's per-row mean is a per-sequence mean.
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


def _gspo(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    in_ratio = (inputs["sequence_ratio_mask"] != 0).to(lp.dtype)  # (rows, T)
    count = in_ratio.sum(dim=-1, keepdim=True).clamp(min=1.0)
    log_ratio = ((lp.detach() - inputs["logprobs"]) * in_ratio).sum(dim=-1, keepdim=True) / count  # (rows, 1)
    ratio = torch.exp(log_ratio + lp - lp.detach())  # the sequence ratio's value, each token's own gradient
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _stable_reinforce(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    recorded = inputs["stability_mask"]
    weight = _ratio(lp, inputs).clamp(max=1.0).detach()
    penalty = 0.5 * config["kl_coeff"] * (lp - inputs["logprobs"]) ** 2
    return recorded * (-weight * lp * inputs["advantages"] + penalty)


_RL_INPUTS = ("logprobs", "advantages")
LOSS_FUNCTIONS: dict[str, LossFunction] = {
    "cross_entropy": LossFunction(("weights",), {}, _cross_entropy),
    "importance_sampling": LossFunction(_RL_INPUTS, {}, _importance_sampling),
    "ppo": LossFunction(_RL_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _ppo),
    # The hosted service's current default is a one-sided clip (older docs said 0.8/1.2).
    "cispo": LossFunction(_RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, _cispo),
    # Tinker's docs show beta=0.05 in every example and document no default; we use it.
    "dro": LossFunction(_RL_INPUTS, {"beta": 0.05}, _dro),
    # GSPO's paper clips the sequence ratio to [1 - 3e-4, 1 + 4e-4]; Tinker documents no
    # default. The Tinker API fills sequence_ratio_mask (where advantages != 0) when absent.
    "gspo": LossFunction(
        (*_RL_INPUTS, "sequence_ratio_mask"), {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}, _gspo
    ),
    # logprobs and stability_mask come from the recorded sequences (http/tinker/provenance.py).
    "stable_reinforce": LossFunction((*_RL_INPUTS, "stability_mask"), {"kl_coeff": 0.0}, _stable_reinforce),
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
