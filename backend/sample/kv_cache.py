"""Prefill caches and recurrent-state helpers, for attention layers and recurrent ones alike.

A prefill group's cache is a transformers DynamicCache: attention layers cache keys and
values (B, heads, L, head_dim), one column per position, left-padded so every row ends in
the last column. Linear-attention (recurrent) layers of hybrid models (Qwen3.5, Qwen3-Next)
keep fixed-size per-row states instead: a conv state (B, C, kernel) and a recurrent state
(B, heads, dk, dv) per state index, with no length; padding them is meaningless and rows
join or leave by stacking or selecting along B. Updates of recurrent states happen in place.
The decode batch's own cache is slot_cache.py.
"""

from __future__ import annotations

import torch


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


def has_keys(layer) -> bool:
    return getattr(layer, "keys", None) is not None and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4


def states_of(layer) -> list[tuple[dict, int]]:
    """(state dict, index) of every initialised state tensor of a recurrent layer."""
    out = []
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            out.append((layer.conv_states, i))
        if layer.is_recurrent_states_initialized[i]:
            out.append((layer.recurrent_states, i))
    return out


def hold_states(cache) -> list[tuple[dict, int, torch.Tensor]]:
    """Give every recurrent state a fresh copy to be updated in place and return the
    originals, so a failed pass can be undone (``restore_states``)."""
    held = []
    for layer in cache.layers:
        if is_recurrent(layer):
            for states, i in states_of(layer):
                held.append((states, i, states[i]))
                states[i] = states[i].clone()
    return held


def restore_states(held: list[tuple[dict, int, torch.Tensor]]) -> None:
    for states, i, original in held:
        states[i] = original
