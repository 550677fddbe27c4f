"""Sampling parameters, the rows and completions of a sample, and prompt log-probabilities
(token choice is in choose.py, decoding in decode.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from thinker.core.errors import BadRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 50
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()  # stop tokens, besides end-of-sequence
    stop_at_eos: bool = True  # False: only max_tokens, stop strings and stop_token_ids end a row
    keep_stop_token: bool = False  # True (Tinker): a stop token ends ``tokens``; False: it is dropped


@dataclass
class SampleRow:
    adapter_id: str | None  # None: the base model alone
    prompt_tokens: list[int]
    params: SamplingParams


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the model's log p of each token in ``tokens``
    text: str = ""
    stop_reason: str = "length"  # "stop": end-of-turn token or a stop string; "length": max_tokens


def sample_response(completions: Sequence[Completion]) -> dict:
    """The seed API's answer for a sampling request."""
    outputs = [c.text for c in completions]
    return {
        "generated_text": outputs[0] if outputs else "",
        "outputs": outputs,
        "stop_reasons": [c.stop_reason for c in completions],
        "num_tokens": [len(c.tokens) for c in completions],
    }


def check_prompts(rows: Sequence[SampleRow], context_length: int) -> None:
    for i, row in enumerate(rows):
        if len(row.prompt_tokens) >= context_length:
            raise BadRequestError(
                f"prompts[{i}]: the rendered prompt has {len(row.prompt_tokens)} tokens; the model's "
                f"context window is {context_length}"
            )


@torch.no_grad()
def prompt_logprobs(
    model: nn.Module, adapter_id: str | None, tokens: Sequence[int], topk: int, device: torch.device
) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """log p(tokens[t] | tokens[:t]) for every prompt position (None at 0, which has no
    context), and when ``topk`` > 0 the ``topk`` likeliest tokens at each position."""
    from backend.lora.routing import use_adapters

    ids_1T = torch.tensor([list(tokens)], device=device)
    with use_adapters([adapter_id], device):
        logits_TV = model(input_ids=ids_1T).logits[0].float()
    logsoftmax_TV = torch.log_softmax(logits_TV[:-1], dim=-1)  # row t-1 predicts token t
    values = logsoftmax_TV.gather(1, ids_1T[0, 1:, None])[:, 0].tolist()
    top = None
    if topk > 0:
        best_TK = logsoftmax_TV.topk(min(topk, logsoftmax_TV.shape[-1]), dim=-1)
        pairs = zip(best_TK.indices.tolist(), best_TK.values.tolist(), strict=True)
        top = [None] + [list(zip(ids, lps, strict=True)) for ids, lps in pairs]
    return [None, *values], top
