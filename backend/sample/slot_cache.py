"""The decode batch's KV cache: one preallocated slot per row, rows join and leave in place.

Every attention layer owns two buffers, keys and values (S, heads, C, head_dim): S slots,
C columns. Row ``i`` of the batch lives in slot ``i`` (the live rows fill slots [0, n)).
All rows share one frontier column ``c``: a decode step writes every row's new key and
value at column ``c`` and attends over columns [first, c] of its slot, ``first`` being the
leftmost column any live row uses. A row joins by having its prefilled prompt copied into
the columns just left of the frontier (its own slot, no one else touched); a row leaves by
having the last live row moved into its slot (one row's columns copied, no one re-padded).
Columns past the frontier are never read, so a failed step that wrote column ``c`` needs no
undo. When the frontier reaches the capacity, or a prompt longer than the frontier joins,
the buffers are laid out anew (grown, or the live span moved to the left): amortised by
doubling, that is the only copy of every row.

Recurrent (linear-attention) layers of hybrid models keep their fixed-size per-row states
as transformers' own layers do, compacted to the n live rows: selecting or stacking them
costs one state per row, not a sequence.

The cache is a transformers ``Cache``: the model calls ``update`` on its layers as on any
other cache, and asks them for the mask sizes (``first``..``c``, no offset).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from backend.sample import kv_cache


@dataclass
class _Window:
    """The geometry every layer of one cache (or part view) shares."""

    start: int  # first slot of this view (0, or a part's start)
    rows: int  # live rows, slots [start, start + rows)
    first: int  # leftmost column any row needs
    frontier: int  # the column the next decode step writes


class SlotLayer(CacheLayerMixin):
    """One attention layer's slot buffers (S, heads, C, head_dim)."""

    is_sliding = False

    def __init__(self, window: _Window, keys_SHCD: torch.Tensor, values_SHCD: torch.Tensor) -> None:
        super().__init__()
        self.window = window
        self.keys_SHCD, self.values_SHCD = keys_SHCD, values_SHCD
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are made by SlotCache
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the step's (rows, heads, 1, head_dim) at the frontier; return the window."""
        w = self.window
        rows = slice(w.start, w.start + w.rows)
        self.keys_SHCD[rows, :, w.frontier] = key_states[:, :, -1]
        self.values_SHCD[rows, :, w.frontier] = value_states[:, :, -1]
        cols = slice(w.first, w.frontier + 1)
        return self.keys_SHCD[rows, :, cols], self.values_SHCD[rows, :, cols]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.frontier - self.window.first + query_length, 0

    def get_seq_length(self) -> int:
        return self.window.frontier - self.window.first

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Decode-time cache of a batch whose rows sit in slots; see the module docstring."""

    def __init__(self, template, device: torch.device) -> None:
        """``template``: a prefill cache of this model, for its layer layout, shapes and dtype."""
        self.window = _Window(0, 0, 0, 0)
        self.device = device
        self.mask_SC: torch.Tensor | None = None  # (S, C) True where a column is a real token
        self.positions_S: torch.Tensor | None = None  # (S,) position of each row's next token
        self.starts: list[int] = []  # per live row: its first real column (host-side: no sync to trim)
        layers: list = []
        # per attention layer: (heads, head_dim) of keys and of values (they differ in MLA), dtype
        self._shapes: list[tuple[tuple[int, int], tuple[int, int], torch.dtype] | None] = []
        for layer in template.layers:
            if kv_cache.is_recurrent(layer):
                if kv_cache.has_keys(layer):
                    raise ValueError(
                        "sampling: this model has a layer with both recurrent states and a KV cache, which the "
                        "slot cache does not lay out (no family in docs/model-families.md has one)"
                    )
                fresh = copy.copy(layer)
                fresh.conv_states, fresh.recurrent_states = {}, {}
                fresh.is_conv_states_initialized = dict.fromkeys(layer.is_conv_states_initialized, False)
                fresh.is_recurrent_states_initialized = dict.fromkeys(layer.is_recurrent_states_initialized, False)
                fresh.has_previous_state = dict.fromkeys(layer.has_previous_state, False)
                layers.append(fresh)
                self._shapes.append(None)
            else:
                (_, k_heads, _, k_dim), (_, v_heads, _, v_dim) = layer.keys.shape, layer.values.shape
                layers.append(None)
                self._shapes.append(((k_heads, k_dim), (v_heads, v_dim), layer.keys.dtype))
        super().__init__(layers=layers)
        self._allocate(slots=0, columns=0)

    # ---- what the model sees -------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.window.frontier - self.window.first

    def attention_mask(self) -> torch.Tensor:
        """(rows, window) 1 where a column is real, the frontier included (set by ``advance_mask``)."""
        w = self.window
        return self.mask_SC[w.start : w.start + w.rows, w.first : w.frontier + 1].long()

    def positions(self) -> torch.Tensor:
        """(rows, 1) each row's position for the step."""
        w = self.window
        return self.positions_S[w.start : w.start + w.rows, None]

    # ---- rows joining, stepping, leaving ---------------------------------------------------

    @property
    def capacity(self) -> tuple[int, int]:
        return self.mask_SC.shape[0], self.mask_SC.shape[1]

    def join(self, prefill, mask_BL: torch.Tensor, keep: Sequence[int], lengths: Sequence[int]) -> None:
        """Append the rows ``keep`` of a left-padded prefill cache (mask (B, L)) at the end
        of the batch, their last prompt column just left of the frontier; ``lengths``: the
        kept rows' real prompt lengths. A prefill row listed twice joins twice (two samples
        of one prompt), each with a copy of its own."""
        w = self.window
        width = mask_BL.shape[1]
        new = len(keep)
        keep = torch.tensor(list(keep), device=self.device)
        if w.rows == 0:
            w.first = w.frontier = width  # a fresh batch starts where its prompts end
        slots, columns = self.capacity
        if w.frontier < width:  # a prompt longer than the frontier: everyone moves right
            self._relayout(max(slots, w.rows + new), w.frontier + (width - w.frontier), columns + width)
            slots, columns = self.capacity
        if w.rows + new > slots or w.frontier >= columns:
            self._relayout(max(2 * slots, w.rows + new, 8), w.frontier, max(2 * columns, w.frontier + 64))
        rows = slice(w.rows, w.rows + new)
        cols = slice(w.frontier - width, w.frontier)
        for n, layer in enumerate(prefill.layers):
            if self._shapes[n] is None:
                self._stack_states(self.layers[n], layer, keep)
            else:
                self.layers[n].keys_SHCD[rows, :, cols] = layer.keys[keep]
                self.layers[n].values_SHCD[rows, :, cols] = layer.values[keep]
        mask_BL = mask_BL[keep].bool()
        self.mask_SC[rows] = False
        self.mask_SC[rows, cols] = mask_BL
        self.positions_S[rows] = torch.tensor(list(lengths), device=self.device)
        self.starts += [w.frontier - n for n in lengths]
        w.rows += new
        w.first = min(self.starts)

    def advance_mask(self) -> None:
        """Mark the frontier column real for every row (before the step's forward)."""
        w = self.window
        self.mask_SC[w.start : w.start + w.rows, w.frontier] = True

    def advance(self) -> None:
        """After a successful step: the frontier moves on; grown first when it is full."""
        w = self.window
        self.positions_S[: w.rows] += 1
        w.frontier += 1
        slots, columns = self.capacity
        if w.frontier >= columns:
            span = w.frontier - w.first
            self._relayout(slots, span, max(columns, 2 * span + 64))

    def keep_rows(self, keep: Sequence[int], states_done: bool = False) -> None:
        """Keep the rows at these positions, in this order; the others leave. Only rows whose
        position changes are copied. ``states_done``: the recurrent states already hold
        just these rows (after a step run in parts)."""
        w = self.window
        keep = list(keep)
        if keep == list(range(w.rows)):
            return
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        for layer in self.layers:
            if isinstance(layer, SlotLayer) or states_done:
                continue
            for states, i in kv_cache.states_of(layer):
                states[i] = states[i].index_select(0, index)
        moves = [(target, source) for target, source in enumerate(keep) if target != source]
        if moves:
            targets = torch.tensor([t for t, _ in moves], device=self.device)
            sources = torch.tensor([s for _, s in moves], device=self.device)
            cols = slice(w.first, w.frontier + 1)
            for layer in self.layers:
                if isinstance(layer, SlotLayer):
                    layer.keys_SHCD[targets, :, cols] = layer.keys_SHCD[sources, :, cols]
                    layer.values_SHCD[targets, :, cols] = layer.values_SHCD[sources, :, cols]
            self.mask_SC[targets] = self.mask_SC[sources]
            self.positions_S[targets] = self.positions_S[sources]
        self.starts = [self.starts[j] for j in keep]
        w.rows = len(keep)
        # Columns left of every remaining row's start are padding for all: no longer attended.
        w.first = min(self.starts) if keep else 0
        if w.rows == 0:
            w.frontier = 0

    def clear(self) -> None:
        self.keep_rows([])

    # ---- failure handling ----------------------------------------------------------------

    def part(self, start: int, stop: int) -> SlotCache:
        """Rows [start, stop) as a cache of their own: attention layers share this cache's
        buffers (a step writes the frontier column only), recurrent states are copies (a
        step updates them in place; ``take_part_states`` brings the survivors' back)."""
        view = copy.copy(self)
        view.window = _Window(start, stop - start, self.window.first, self.window.frontier)
        view.layers = []
        for layer in self.layers:
            if isinstance(layer, SlotLayer):
                shared = copy.copy(layer)
                shared.window = view.window
                view.layers.append(shared)
            else:
                states = copy.copy(layer)
                states.conv_states, states.recurrent_states = dict(layer.conv_states), dict(layer.recurrent_states)
                for held, i in kv_cache.states_of(states):
                    held[i] = held[i][start:stop].clone()
                view.layers.append(states)
        return view

    def take_part_states(self, parts: Sequence[SlotCache]) -> None:
        """Recurrent states: the parts' (grown by their step), stacked in order."""
        for n, layer in enumerate(self.layers):
            if isinstance(layer, SlotLayer):
                continue
            grown = [kv_cache.states_of(part.layers[n]) for part in parts]
            for k, (states, i) in enumerate(kv_cache.states_of(layer)):
                states[i] = torch.cat([g[k][0][g[k][1]] for g in grown]) if grown else states[i][:0]

    # ---- internals -----------------------------------------------------------------------

    def _stack_states(self, mine, theirs, keep: torch.Tensor) -> None:
        for i in range(theirs.number_of_states):
            for flag, store, their_store in (
                (mine.is_conv_states_initialized, mine.conv_states, theirs.conv_states),
                (mine.is_recurrent_states_initialized, mine.recurrent_states, theirs.recurrent_states),
            ):
                if i not in their_store:
                    continue
                add = their_store[i][keep]
                store[i] = torch.cat([store[i][: self.window.rows], add]) if flag.get(i) else add
                flag[i] = True
            mine.has_previous_state[i] = theirs.has_previous_state.get(i, True)
            mine.conv_kernel_size[i] = theirs.conv_kernel_size.get(i)
        mine.dtype, mine.device = theirs.dtype, theirs.device

    def _allocate(self, slots: int, columns: int) -> None:
        self.mask_SC = torch.zeros((slots, columns), dtype=torch.bool, device=self.device)
        self.positions_S = torch.zeros((slots,), dtype=torch.long, device=self.device)
        for n, shape in enumerate(self._shapes):
            if shape is not None:
                (k_heads, k_dim), (v_heads, v_dim), dtype = shape
                keys = torch.zeros((slots, k_heads, columns, k_dim), dtype=dtype, device=self.device)
                values = torch.zeros((slots, v_heads, columns, v_dim), dtype=dtype, device=self.device)
                self.layers[n] = SlotLayer(self.window, keys, values)

    def _relayout(self, slots: int, frontier: int, columns: int) -> None:
        """New buffers of ``slots`` x ``columns``, the live span [first, frontier) moved so
        the frontier lands at ``frontier`` (the frontier column itself holds nothing yet)."""
        w = self.window
        old_layers, old_mask, old_positions = list(self.layers), self.mask_SC, self.positions_S
        self._allocate(slots, columns)
        shift = frontier - w.frontier
        rows, src = slice(0, w.rows), slice(w.first, w.frontier)
        dst = slice(w.first + shift, w.frontier + shift)
        for n, old in enumerate(old_layers):
            if isinstance(old, SlotLayer):
                self.layers[n].keys_SHCD[rows, :, dst] = old.keys_SHCD[rows, :, src]
                self.layers[n].values_SHCD[rows, :, dst] = old.values_SHCD[rows, :, src]
            else:
                self.layers[n] = old
        if w.rows:
            self.mask_SC[rows, dst] = old_mask[rows, src]
            self.positions_S[rows] = old_positions[rows]
        w.first, w.frontier = w.first + shift, frontier
        self.starts = [start + shift for start in self.starts]
