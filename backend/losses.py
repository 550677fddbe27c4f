"""Loss functions over padded batches of examples.

Losses are returned as per-row weighted sums so the caller can normalise each request
on its own (a request's loss is its mean per loss token, wherever its rows sit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_FUNCTIONS = ("cross_entropy",)


def target_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position: (B, T, V), (B, T) -> (B, T), in fp32."""
    B, T, V = logits_BTV.shape
    nll = F.cross_entropy(logits_BTV.reshape(B * T, V).float(), targets_BT.reshape(B * T), reduction="none")
    return -nll.view(B, T)


def cross_entropy_row_sums(logprobs_BT: torch.Tensor, weights_BT: torch.Tensor) -> torch.Tensor:
    """Weighted negative log-likelihood summed per row: -> (B,)."""
    return -(logprobs_BT * weights_BT).sum(dim=1)
