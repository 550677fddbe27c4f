"""Token choice for a whole decode batch at once: per-row parameters as tensors, no sort.

Each row keeps its own temperature, top-k, top-p and seed; they live in tensors of shape
(B,), rebuilt only when rows join or leave (``RowParams``). A step then runs a fixed series
of batched ops and hands back every row's token and log-probability in ONE device-to-host
transfer (``choose``).

- Greedy rows (temperature 0) take the argmax.
- top-k: ``torch.topk`` with k bounded by the largest top_k in the batch gives each row its
  k-th largest logit; tokens below it are dropped. No full sort.
- top-p: a threshold search instead of a sort: bisection on a probability threshold t with
  the mass of tokens above t, over all rows at once (``_TOP_P_ITERATIONS`` halvings). A
  token is kept when the tokens likelier than it hold less than top_p, as with a sort.
- The draw is by inverse CDF with one uniform number per row, from a counter-based hash of
  (seed, step) computed on the host: reproducible per seed whatever the batch company, and
  with no generator state on the device.

Log-probabilities are of the untempered, untruncated distribution (what a training forward
computes), as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backend.sample.sampling import SamplingParams

_TOP_P_ITERATIONS = 24  # the threshold to 2^-24 of the top probability
_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) from (seed, step): splitmix64 of the pair (counter-based, stateless)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


@dataclass
class RowParams:
    """The batch's sampling parameters as tensors (B,), and what the host knows of them."""

    temperature_B: torch.Tensor  # 1 for greedy rows (unused there)
    greedy_B: torch.Tensor  # bool
    top_k_B: torch.Tensor  # long, 0: no limit
    top_p_B: torch.Tensor
    all_greedy: bool
    max_top_k: int  # 0: no row limits k
    any_top_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> RowParams:
        greedy = [p.temperature == 0 for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        return cls(
            temperature_B=torch.tensor([p.temperature or 1.0 for p in params], device=device),
            greedy_B=torch.tensor(greedy, device=device),
            top_k_B=torch.tensor(top_k, device=device),
            top_p_B=torch.tensor([p.top_p for p in params], device=device),
            all_greedy=all(greedy),
            max_top_k=max((k for k, g in zip(top_k, greedy, strict=True) if not g), default=0),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
        )


def choose(logits_BV: torch.Tensor, params: RowParams, uniforms: Sequence[float]) -> tuple[list[int], list[float]]:
    """Every row's next token and its log-probability, fetched in one transfer."""
    logprobs_BV = logits_BV - torch.logsumexp(logits_BV, dim=-1, keepdim=True)
    if params.all_greedy:
        tokens_B = logits_BV.argmax(-1)
    else:
        tokens_B = torch.where(params.greedy_B, logits_BV.argmax(-1), _draw(logits_BV, params, uniforms))
    chosen_B = logprobs_BV.gather(1, tokens_B[:, None])[:, 0]
    both_2B = torch.stack([tokens_B.double(), chosen_B.double()]).cpu()  # the step's one transfer
    return [int(t) for t in both_2B[0].tolist()], both_2B[1].tolist()


def _draw(logits_BV: torch.Tensor, params: RowParams, uniforms: Sequence[float]) -> torch.Tensor:
    scaled_BV = logits_BV / params.temperature_B[:, None]
    if params.max_top_k:
        top_BK = torch.topk(scaled_BV, params.max_top_k, dim=-1).values  # sorted, descending
        kth_B = top_BK.gather(1, (params.top_k_B.clamp(min=1) - 1)[:, None])[:, 0]
        kth_B = torch.where(params.top_k_B > 0, kth_B, torch.full_like(kth_B, float("-inf")))
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B[:, None], float("-inf"))
    probs_BV = torch.softmax(scaled_BV, dim=-1)
    if params.any_top_p:
        probs_BV = probs_BV.masked_fill(probs_BV <= _top_p_threshold(probs_BV, params.top_p_B)[:, None], 0.0)
    cdf_BV = probs_BV.cumsum(-1)
    u_B1 = torch.tensor(uniforms, device=logits_BV.device, dtype=cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]
    tokens_B = torch.searchsorted(cdf_BV, u_B1, right=True)[:, 0]
    # (a token of probability 0 is never chosen: searchsorted(right) steps over flat parts)
    return tokens_B.clamp(max=logits_BV.shape[-1] - 1)


def _top_p_threshold(probs_BV: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Per row, a probability t such that keeping the tokens of probability > t keeps exactly
    those whose likelier tokens hold less than top_p (-1: keep all, for rows without top-p).
    Bisection: ``high`` always valid (the mass above it < top_p), ``low`` never."""
    high_B = probs_BV.max(-1).values  # nothing is above the top token: valid
    low_B = torch.zeros_like(high_B)  # everything is above 0: mass 1 >= top_p, invalid
    for _ in range(_TOP_P_ITERATIONS):
        mid_B = (low_B + high_B) / 2
        above_B = (probs_BV * (probs_BV > mid_B[:, None])).sum(-1)
        valid_B = above_B < top_p_B
        low_B, high_B = torch.where(valid_B, low_B, mid_B), torch.where(valid_B, mid_B, high_B)
    # The last kept token's probability lies in (low, high]: keep everything above low.
    return torch.where(top_p_B < 1.0, low_B, torch.full_like(low_B, -1.0))
