"""Variable-length attention for packed training passes: each sequence attends to itself only,
at the cost of its own length squared.

A packed pass (backend/train/packing.py) lays every sequence end to end in one (1, N) row.
Left to transformers, the sdpa path then builds a dense (N, N) block-diagonal mask and
runs attention over the whole row: N^2 work (and a masked kernel) where the sequences
alone cost sum(n_i^2), and the rows had to be cut at the longest sequence, padding their
tails, to keep that in check. Here the attention of a packed pass is cut per sequence
instead (``cu_seqlens`` as flash-attention's varlen kernels take it):

    for each sequence i owning tokens [s_i, e_i) of the row:
        out[:, s_i:e_i] = sdpa(q[:, :, s_i:e_i], k[:, :, s_i:e_i], v[:, :, s_i:e_i], causal)

so the row needs no padding at all, every other layer sees exactly the real tokens, and
each sequence's attention is the very call it gets alone (causal, no mask, the same
kernel). Sliding windows narrower than a sequence get that sequence's band mask.

How it reaches the model: transformers looks attention up by the name in the model's
config (``AttentionInterface``). ``enable(model)`` switches a model running "sdpa" to the
name registered here, whose functions are sdpa's own unless a packed pass is running on
this thread (``sequences(...)``, a ContextVar like the LoRA routing's, so concurrent
forwards on other threads see plain sdpa). While it runs, the mask function returns no
mask (nothing to build) and the attention function splits by sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

NAME = "thinker_varlen_sdpa"


@dataclass(frozen=True)
class PackedSequences:
    """Token ranges ``[start, end)`` of one (1, N) packed row, in order, covering it."""

    bounds: tuple[tuple[int, int], ...]
    total: int  # N

    @classmethod
    def of(cls, lengths: Sequence[int]) -> PackedSequences:
        bounds, start = [], 0
        for n in lengths:
            bounds.append((start, start + n))
            start += n
        return cls(tuple(bounds), start)


@dataclass
class _Active:
    packed: PackedSequences
    calls: int = 0  # attention layers that split the row (a check that the model came through here)


_current: ContextVar[_Active | None] = ContextVar("thinker_varlen_sequences", default=None)


@contextmanager
def sequences(packed: PackedSequences) -> Iterator[_Active]:
    """Attention of this thread's forwards keeps to ``packed``'s sequences; ``.calls`` of
    what it yields counts the attention calls that did."""
    active = _Active(packed)
    token = _current.set(active)
    try:
        yield active
    finally:
        _current.reset(token)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (1, H, N, D), key/value (1, H_kv, N, D)
    -> ((1, N, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    active = _current.get()
    if active is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    packed = active.packed
    if query.shape[0] != 1 or query.shape[2] != packed.total or key.shape[2] != packed.total:
        raise RuntimeError(
            f"varlen attention: the packed row has {packed.total} tokens, the layer's query is {tuple(query.shape)}"
        )
    active.calls += 1
    window = kwargs.pop("sliding_window", None)
    outs = []
    for start, end in packed.bounds:
        band = _band_mask(end - start, window, query.device) if window is not None and end - start > window else None
        out_1nHD, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], band,
            dropout=dropout, scaling=scaling, is_causal=True, **kwargs,
        )  # fmt: skip
        outs.append(out_1nHD)
    return torch.cat(outs, dim=1), None


def _band_mask(n: int, window: int, device) -> torch.Tensor:
    """(1, 1, n, n) causal sliding-window mask, transformers' convention: q - window < kv <= q."""
    q_n1 = torch.arange(n, device=device).unsqueeze(1)
    kv_1n = torch.arange(n, device=device).unsqueeze(0)
    return ((kv_1n <= q_n1) & (kv_1n > q_n1 - window)).view(1, 1, n, n)


def _mask(*args, **kwargs):
    """No mask for a packed pass (the attention splits by sequence), else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if _current.get() is not None else sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions under ``NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)


def enable(model) -> bool:
    """Switch ``model`` from "sdpa" to ``NAME`` (identical outside a packed pass). False
    where it runs another implementation or its modeling code does not look attention up
    through the interface (then it keeps what it had)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == NAME:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _uses_interface(model):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except Exception:  # noqa: BLE001 - a model that refuses the switch keeps plain sdpa
        return False
    return model.config._attn_implementation == NAME


def disable(model) -> None:
    """Back to plain sdpa (after a failed check)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


def _uses_interface(model) -> bool:
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    try:
        return bool(can_set and can_set())
    except Exception:  # noqa: BLE001
        return False
