"""Packed training passes: the sequences of a fused pass laid end to end, without padding.

Right-padding every row to the longest one wastes compute in proportion to the spread
of lengths (a 40-token sequence beside a 2,000-token one costs 2,000 positions). Packed,
position ids restart at 0 for each sequence, and attention is kept to each sequence one
of two ways (``packing_mode``):

- "varlen" (models on sdpa): one (1, N) row of exactly the N real tokens, in request
  order, and attention cut per sequence (backend/train/varlen.py): every layer computes
  what the sequences alone compute, no more.
- "rows" (other attention implementations): first-fit decreasing into rows as long as the
  longest sequence (``pack``), no attention mask: transformers' masking utilities
  (masking_utils.find_packed_sequence_indices) read the sequence boundaries from the
  position ids and build a block-diagonal causal mask (sliding windows included). Rows
  are capped at the longest sequence because that mask is dense: one row for everything
  would make attention quadratic in the pass's whole token count. Their tails are padding.

Either way no token attends across sequences and each sequence's logits are what it gets alone.

Not every model honours that: a recurrent / linear-attention layer (hybrid models) would
carry its state from one sequence into the next, and a model whose attention ignores the
packed position ids would mix sequences. So packing is decided once per model, on first
use, by an explicit check (``packing_supported``): no recurrent layer in the model's
cache layout, and a probe (two short sequences packed vs each alone) that must agree.
A model that fails either runs the padded path as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.train import varlen
from backend.train.varlen import PackedSequences

# The verdict per model object; an attribute rather than a dict keyed by id() so that it
# dies with the model.
_VERDICT_ATTR = "_thinker_packing_mode"
PROBE_LENGTHS = (12, 5)  # two sequences, different lengths (past tiny sliding windows)


def packing_mode(model) -> str | None:
    """How ``model`` packs: "varlen", "rows", or None (pads). Checked once, then cached."""
    mode = getattr(model, _VERDICT_ATTR, "unknown")
    if mode == "unknown":
        mode = None
        if not has_recurrent_layers(model) and _probe(model):
            mode = "varlen" if _varlen_works(model) else "rows"
        try:
            setattr(model, _VERDICT_ATTR, mode)
        except (AttributeError, TypeError):  # a model that refuses attributes: check every time
            pass
    return mode


def packing_supported(model) -> bool:
    """Whether ``model`` runs packed sequences exactly as alone (either way)."""
    return packing_mode(model) is not None


def has_recurrent_layers(model) -> bool:
    """A recurrent / linear-attention layer anywhere: its state would flow across sequences."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - a config the cache cannot read: fall back to the probe
        return False
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)


def packed_positions(lengths: Sequence[int], device) -> torch.Tensor:
    """(1, N) position ids restarting at 0 for each sequence."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)


@dataclass(frozen=True)
class PackedLayout:
    """B sequences packed into P rows of L tokens (L: the longest sequence, so attention
    never spans more than a padded row would; one row for everything would make the
    attention quadratic in the pass's whole token count)."""

    width: int  # L
    bins: list[list[int]]  # (P,) the sequences of each row, in order
    flat_N: torch.Tensor  # (N,) each real token's index in the flattened (P*L,) layout, row-major by sequence
    positions_PL: torch.Tensor  # restarting at 0 per sequence (and for each row's padded tail)
    spans: list[tuple[int | None, int]]  # (sequence or None for padding, length) in flattened order
    sequences: PackedSequences | None = None  # varlen: the one row's sequences (attention is cut by them)


def pack_one_row(lengths: Sequence[int], device) -> PackedLayout:
    """Every sequence in one (1, N) row, in order, no padding (for varlen attention)."""
    N = sum(lengths)
    positions_1N = packed_positions(lengths, device)
    flat_N = torch.arange(N, device=device)
    spans: list[tuple[int | None, int]] = list(enumerate(lengths))
    return PackedLayout(N, [list(range(len(lengths)))], flat_N, positions_1N, spans, PackedSequences.of(lengths))


def pack(lengths: Sequence[int], device) -> PackedLayout:
    """First-fit decreasing into rows as long as the longest sequence."""
    L = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((p for p, left in enumerate(room) if left >= lengths[b]), None)
        if slot is None:
            bins.append([])
            room.append(L)
            slot = len(bins) - 1
        bins[slot].append(b)
        room[slot] -= lengths[b]
    for row in bins:  # sequences in their original order within a row: adapters stay together
        row.sort()
    starts = [0] * len(lengths)
    spans: list[tuple[int | None, int]] = []
    positions: list[torch.Tensor] = []
    for p, row in enumerate(bins):
        offset = p * L
        for b in row:
            starts[b] = offset
            spans.append((b, lengths[b]))
            positions.append(torch.arange(lengths[b]))
            offset += lengths[b]
        if offset < (p + 1) * L:
            spans.append((None, (p + 1) * L - offset))
            positions.append(torch.arange((p + 1) * L - offset))
    flat_N = torch.cat([torch.arange(starts[b], starts[b] + n) for b, n in enumerate(lengths)])
    positions_PL = torch.cat(positions).reshape(len(bins), L)
    return PackedLayout(L, bins, flat_N.to(device), positions_PL.to(device), spans)


@torch.no_grad()
def _varlen_works(model) -> bool:
    """Switch ``model`` to varlen attention if it can take it, and check that the packed row
    then gives each sequence its logits alone, through the split attention, and that plain
    forwards are unchanged by the switch (else switch back)."""
    device = next(model.parameters()).device
    seqs = _probe_sequences(model)
    try:
        before = torch.cat([_logprobs(model, s.unsqueeze(0).to(device), None)[0] for s in seqs])
    except Exception:  # noqa: BLE001 - _probe ran the same calls; a model this fails on pads
        return False
    if not varlen.enable(model):
        return False
    try:
        after = torch.cat([_logprobs(model, s.unsqueeze(0).to(device), None)[0] for s in seqs])
        with varlen.sequences(PackedSequences.of(PROBE_LENGTHS)) as active:
            packed_1N = torch.cat(seqs).unsqueeze(0).to(device)
            packed_NV = _logprobs(model, packed_1N, packed_positions(PROBE_LENGTHS, device))[0]
        works = active.calls > 0 and torch.equal(before, after) and _agree(model, packed_NV, before)
    except Exception:  # noqa: BLE001 - whatever fails here, the model keeps plain sdpa
        works = False
    if not works:
        varlen.disable(model)
    return works


def _probe_sequences(model) -> list[torch.Tensor]:
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (n,), generator=generator) for n in PROBE_LENGTHS]


def _agree(model, packed_NV: torch.Tensor, expected_NV: torch.Tensor) -> bool:
    # fp32 agrees to rounding; half precision runs other kernel shapes, so a looser bar.
    # A mask that leaks across sequences moves logprobs by far more than either.
    tolerance = 1e-3 if packed_NV.dtype == torch.float32 and model.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(packed_NV, expected_NV, atol=tolerance, rtol=tolerance))


@torch.no_grad()
def _probe(model) -> bool:
    """Two sequences packed vs each alone, on the base model: do their logits agree?"""
    device = next(model.parameters()).device
    seqs = _probe_sequences(model)
    try:
        alone = [_logprobs(model, s.unsqueeze(0).to(device), None)[0] for s in seqs]
        packed_1N = torch.cat(seqs).unsqueeze(0).to(device)
        packed_NV = _logprobs(model, packed_1N, packed_positions(PROBE_LENGTHS, device))[0]
    except Exception:  # noqa: BLE001 - a model that cannot take packed position ids: pad
        return False
    return _agree(model, packed_NV, torch.cat(alone))


def _logprobs(model, inputs_1N: torch.Tensor, positions_1N: torch.Tensor | None) -> torch.Tensor:
    if positions_1N is None:
        positions_1N = torch.arange(inputs_1N.shape[1], device=inputs_1N.device).unsqueeze(0)
    logits_1NV = model(input_ids=inputs_1N, position_ids=positions_1N, use_cache=False).logits
    return F.log_softmax(logits_1NV.float(), dim=-1)
