"""The decode batch's cache operations, for attention layers and recurrent ones alike.

Attention layers cache keys and values (B, heads, L, head_dim), one column per position,
left-padded so every row ends in the last column. Linear-attention (recurrent) layers of
hybrid models (Qwen3.5, Qwen3-Next) keep fixed-size per-row states instead: a conv state
(B, C, kernel) and a recurrent state (B, heads, dk, dv) per state index, with no length;
padding them is meaningless and rows join or leave by stacking or selecting along B.
Hybrid layers carry both. Updates of recurrent states happen in place.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _linear_layer_class():
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return LinearAttentionCacheLayerMixin


def new_cache(model, hybrid: bool | None = None):
    """An empty cache for ``model`` (``hybrid``: whether it has recurrent layers, when the
    caller knows; finding out costs a cache built from the config, ~0.5 ms for 30 layers).
    For a model with recurrent layers, built from its config
    (so those layers get state slots) with every attention layer a plain full-length layer:
    the batch's mask, trimming and merging assume one cached column per position, which a
    sliding-window layer (keeping only its window) would break. Otherwise a plain
    DynamicCache, whose layers are created as the forward reaches them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if hybrid is False:
        return DynamicCache()
    try:
        built = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: no recurrent layers known
        return DynamicCache()
    if not any(is_recurrent(layer) for layer in built.layers):
        return DynamicCache()
    built.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in built.layers]
    return built


def is_recurrent(layer) -> bool:
    return isinstance(layer, _linear_layer_class())


def has_recurrent(cache) -> bool:
    return cache is not None and any(is_recurrent(layer) for layer in cache.layers)


def _has_keys(layer) -> bool:
    return getattr(layer, "keys", None) is not None and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4


def _states(layer) -> list[tuple[dict, int]]:
    """(state dict, index) of every initialised state tensor of a recurrent layer."""
    out = []
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            out.append((layer.conv_states, i))
        if layer.is_recurrent_states_initialized[i]:
            out.append((layer.recurrent_states, i))
    return out


def select_rows(cache, index: torch.Tensor) -> None:
    """Keep the rows at ``index`` (B',) of every layer."""
    for layer in cache.layers:
        if is_recurrent(layer):
            for states, i in _states(layer):
                states[i] = states[i].index_select(0, index)
        if _has_keys(layer):
            layer.keys, layer.values = layer.keys[index], layer.values[index]


def trim_left(cache, first: int) -> None:
    """Drop the first ``first`` columns of every attention layer (padding for every row)."""
    for layer in cache.layers:
        if _has_keys(layer):
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


def truncate(cache, length: int) -> None:
    """Attention layers back to ``length`` columns (after a failed pass grew some)."""
    for layer in cache.layers:
        if _has_keys(layer):
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def merge(mine, theirs, pad_mine: int, pad_theirs: int) -> None:
    """Append ``theirs``' rows to ``mine``: attention layers left-padded by the given number
    of columns and stacked, recurrent states stacked as they are."""
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        if is_recurrent(a):
            for (states, i), (their_states, j) in zip(_states(a), _states(b), strict=True):
                states[i] = torch.cat([states[i], their_states[j]])
        if _has_keys(a):
            # (B, heads, L, head_dim): pad dimension -2 on the left
            a.keys = torch.cat([F.pad(a.keys, (0, 0, pad_mine, 0)), F.pad(b.keys, (0, 0, pad_theirs, 0))])
            a.values = torch.cat([F.pad(a.values, (0, 0, pad_mine, 0)), F.pad(b.values, (0, 0, pad_theirs, 0))])


def part_view(cache, start: int, stop: int):
    """A cache of rows [start, stop). Attention layers share this cache's memory (a forward
    grows them into new tensors); recurrent states are copied, since a forward updates
    them in place and must leave this cache as it was."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    part = DynamicCache()
    part.layers = []
    for layer in cache.layers:
        if is_recurrent(layer):
            view = copy.copy(layer)
            view.conv_states, view.recurrent_states = dict(layer.conv_states), dict(layer.recurrent_states)
            for states, i in _states(view):
                states[i] = states[i][start:stop].clone()
            if _has_keys(layer):
                view.keys, view.values = layer.keys[start:stop], layer.values[start:stop]
        else:
            view = DynamicLayer()
            view.lazy_initialization(layer.keys, layer.values)
            view.keys, view.values = layer.keys[start:stop], layer.values[start:stop]  # (b, heads, L, head_dim)
        part.layers.append(view)
    return part


def stack_parts(cache, parts: Sequence) -> None:
    """Replace ``cache``'s rows by the parts' rows, in order (the parts cover the rows kept)."""
    for n, layer in enumerate(cache.layers):
        grown = [part.layers[n] for part in parts]
        if is_recurrent(layer):
            grown_states = [_states(g) for g in grown]
            for k, (states, i) in enumerate(_states(layer)):
                states[i] = torch.cat([part_states[k][0][part_states[k][1]] for part_states in grown_states])
        if _has_keys(layer):
            layer.keys, layer.values = torch.cat([g.keys for g in grown]), torch.cat([g.values for g in grown])
            for g in grown:  # freed layer by layer, so the peak stays near one extra layer
                g.keys = g.values = None


def hold_states(cache) -> list[tuple[dict, int, torch.Tensor]]:
    """Give every recurrent state a fresh copy to be updated in place and return the
    originals, so a failed pass can be undone (``restore_states``)."""
    held = []
    for layer in cache.layers:
        if is_recurrent(layer):
            for states, i in _states(layer):
                held.append((states, i, states[i]))
                states[i] = states[i].clone()
    return held


def restore_states(held: list[tuple[dict, int, torch.Tensor]]) -> None:
    for states, i, original in held:
        states[i] = original
