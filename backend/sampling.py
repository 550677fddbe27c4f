"""Batched autoregressive sampling with a KV cache, each row with its own adapter and
sampling parameters; rows that finish are dropped from the batch (and the cache)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.lora import use_adapters
from errors import BadRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 50
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class SampleRow:
    adapter_id: str | None  # None: the base model alone
    prompt_tokens: list[int]
    params: SamplingParams


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # "stop": end-of-turn token or a stop string; "length": max_tokens


def _choose(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row's next-token logits (V,)."""
    if params.temperature == 0:
        return int(torch.argmax(logits_V))
    logits_V = logits_V / params.temperature
    if 0 < params.top_k < logits_V.shape[0]:
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = torch.softmax(sorted_V, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_V = (torch.cumsum(probs_V, dim=-1) - probs_V) >= params.top_p
        logits_V = logits_V.masked_fill(torch.zeros_like(drop_V).scatter(0, order_V, drop_V), float("-inf"))
    # Gumbel-max: argmax(logits + Gumbel noise) samples from softmax(logits).
    uniform_V = torch.rand(logits_V.shape, generator=generator, device=logits_V.device)
    gumbel_V = -torch.log(-torch.log(uniform_V.clamp_(1e-20, 1.0)))
    return int(torch.argmax(logits_V + gumbel_V))


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    rows: Sequence[SampleRow],
    eos_ids: set[int],
    context_length: int,
    device: torch.device,
) -> list[Completion]:
    from transformers import DynamicCache

    for i, row in enumerate(rows):
        if len(row.prompt_tokens) >= context_length:
            raise BadRequestError(
                f"prompts[{i}]: the rendered prompt has {len(row.prompt_tokens)} tokens; the model's "
                f"context window is {context_length}"
            )
    results = [Completion() for _ in rows]
    budgets = [min(r.params.max_tokens, context_length - len(r.prompt_tokens)) for r in rows]
    generators = []
    for row in rows:
        seed = row.params.seed if row.params.seed is not None else secrets.randbits(63)
        generators.append(torch.Generator(device=device).manual_seed(seed))

    pad_id = tokenizer.pad_token_id
    width = max(len(r.prompt_tokens) for r in rows)
    # Left padding: every row's next token lands in the last column.
    input_ids_BL = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids_BL[i, width - len(row.prompt_tokens) :] = torch.tensor(row.prompt_tokens)
        mask_BL[i, width - len(row.prompt_tokens) :] = 1
    input_ids_BL, mask_BL = input_ids_BL.to(device), mask_BL.to(device)
    positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)

    active = list(range(len(rows)))  # original index of each row still in the batch
    text_done: set[int] = set()  # rows whose text was already cut at a stop string
    cache = DynamicCache()
    while True:
        with use_adapters([rows[i].adapter_id for i in active]):
            out = model(
                input_ids=input_ids_BL,
                attention_mask=mask_BL,
                position_ids=positions_BL,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # only the last position is sampled from
            )
        logits_BV = out.logits[:, -1, :].float()
        next_tokens, keep = [], []
        for j, i in enumerate(active):
            token = _choose(logits_BV[j], rows[i].params, generators[i])
            result = results[i]
            if token in eos_ids:
                result.stop_reason = "stop"
                continue
            result.tokens.append(token)
            if rows[i].params.stop and _cut_at_stop(tokenizer, result, rows[i].params.stop):
                text_done.add(i)
                continue
            if len(result.tokens) >= budgets[i]:
                continue
            next_tokens.append(token)
            keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows stop costing compute
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask_BL = mask_BL[index]
            active = [active[j] for j in keep]
        mask_BL = torch.cat([mask_BL, mask_BL.new_ones(len(active), 1)], dim=1)
        positions_BL = mask_BL.sum(-1, keepdim=True) - 1  # (b, 1)
        input_ids_BL = torch.tensor(next_tokens, device=device).unsqueeze(1)  # (b, 1)

    for i, result in enumerate(results):
        if i not in text_done:
            result.text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return results


def _cut_at_stop(tokenizer, result: Completion, stops: tuple[str, ...]) -> bool:
    """Truncate ``result.text`` at the first stop string, if one has appeared."""
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut < 0:
        return False
    result.text = text[:cut]
    result.stop_reason = "stop"
    return True
