"""The output head, memory-light: log p(target) straight from hidden states, a chunk of
rows at a time, for the models whose logits are exactly ``lm_head(hidden)``.

(The losses built on these log-probabilities are in loss_functions.py.)
"""

from __future__ import annotations

import torch

# Causal LMs whose logits are exactly ``lm_head(last hidden state)`` (no soft-capping or
# scaling), so the head may be applied by ``head_target_logprobs`` instead.
PLAIN_HEAD_MODELS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}

# Rows of logits materialised at once by head_target_logprobs, as a number of floats.
_HEAD_CHUNK_FLOATS = 8 * 1024 * 1024



class _HeadTargetLogprobs(torch.autograd.Function):
    """log p(target) straight from hidden states and a frozen output head.

    The (N, V) logits are only ever built a chunk of rows at a time, and the gradient is
    formed in the same pass: d log p_t / d h_t = (onehot(t) - softmax) @ W, one (N, H)
    tensor, scaled in backward by the incoming gradient. With a vocabulary of 50k this
    avoids several full-size (N, V) tensors (logits, log-softmax, its gradient)."""

    @staticmethod
    def forward(ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        N, V = hidden_NH.shape[0], weight_VH.shape[0]
        chunk = max(1, _HEAD_CHUNK_FLOATS // V)
        logprobs_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        dlogp_dh_NH = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            logits_nV = (hidden_NH[start:end] @ weight_VH.t()).float()
            lse_n = torch.logsumexp(logits_nV, dim=-1)
            t_n1 = targets_N[start:end].unsqueeze(1)
            logprobs_N[start:end] = logits_nV.gather(1, t_n1).squeeze(1) - lse_n
            if dlogp_dh_NH is not None:
                probs_nV = logits_nV.sub_(lse_n.unsqueeze(1)).exp_()  # softmax, in place
                probs_nV.scatter_add_(1, t_n1, torch.full_like(t_n1, -1.0, dtype=probs_nV.dtype))
                dlogp_dh_NH[start:end] = -(probs_nV.to(weight_VH.dtype) @ weight_VH)
        ctx.save_for_backward(dlogp_dh_NH)
        return logprobs_N

    @staticmethod
    def backward(ctx, grad_logprobs_N: torch.Tensor):
        (dlogp_dh_NH,) = ctx.saved_tensors
        return dlogp_dh_NH * grad_logprobs_N.unsqueeze(1).to(dlogp_dh_NH.dtype), None, None


def head_target_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """log p(targets_N) under logits ``hidden_NH @ weight_VH.T``: -> (N,) fp32.
    The head weight must be frozen (it receives no gradient)."""
    return _HeadTargetLogprobs.apply(hidden_NH, weight_VH, targets_N)
