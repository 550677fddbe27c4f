"""Which adapter each token of one model forward uses: explicit metadata, built once per pass.

A pass (one fused training forward, one decode step, one prompt-logprob call) names an
adapter per batch row. ``Routing.build`` turns that into per-token segments, vLLM/punica
style: for every distinct adapter ``i``, the tokens it owns, either as one contiguous
range ``[s_i, e_i)`` of the flattened (N, features) input (rows of one adapter sit next to
each other: the fused pass lays requests out that way) or, when its rows are interleaved
with others', as an index list. Tokens of rows with no adapter belong to no segment: they
see the base model only.

Token layout: every LoRA layer's input, whatever its shape ((B, T, in) for most models,
(B*T, in) for OPT's fc1/fc2 or an MoE's shared expert), flattens row-major to (N, in)
with N = B * T, so row b owns tokens [b*T, (b+1)*T). The output head may see fewer
tokens per row than the body (``logits_to_keep=1``), so segments are kept per token
count N: built on first use in the pass, then reused by every layer of that size.

Carrier: HF models do not pass extra arguments down to their linear layers, so the
layers find the pass's routing in a ``ContextVar`` set around the forward
(``use_adapters``). It is a carrier only (the object is built by the caller, once, and
never rebuilt by a layer); a ContextVar rather than an attribute on the model because
on a GPU server several forwards run at once on different threads over the one shared
model (the inline runner next to the decode loop), and each must see its own routing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """The S tokens one adapter owns in a (N, features) input, as ``index_S`` (ascending);
    ``contiguous``: they are exactly ``[start, end)``."""

    start: int
    end: int
    index_S: torch.Tensor
    contiguous: bool

    def covers(self, n_tokens: int) -> bool:
        """Every token of the input: the layer can skip the scatter."""
        return self.contiguous and self.start == 0 and self.end == n_tokens


@dataclass
class Routing:
    """The adapter of every row of one pass, and the token segments derived from it."""

    row_adapters: tuple[str | None, ...]  # (B,) adapter per row; None: the base model only
    adapters: tuple[str, ...]  # the distinct adapters, in order of first appearance
    device: torch.device
    # Token count N -> adapter -> its segment; filled once per N (see the module docstring).
    _segments: dict[int, dict[str, Segment]] = field(default_factory=dict, repr=False)
    # Packed (``from_lengths``): the only token count the routing covers (rows differ in length).
    packed_tokens: int | None = None

    @property
    def uniform(self) -> bool:
        """Every row on one adapter (or all on the base model): any token count routes."""
        return len(set(self.row_adapters)) <= 1

    @classmethod
    def build(
        cls,
        row_adapters: Sequence[str | None],
        device: torch.device | str = "cpu",
        tokens_per_row: int | None = None,
    ) -> Routing:
        """Routing for rows ``row_adapters``; ``tokens_per_row``: build the body's
        segments now (else on the first layer's call)."""
        rows = tuple(row_adapters)
        routing = cls(rows, tuple(dict.fromkeys(a for a in rows if a)), torch.device(device))
        if tokens_per_row is not None:
            routing.segments(len(rows) * tokens_per_row)
        return routing

    @classmethod
    def from_lengths(
        cls, sequences: Sequence[tuple[str | None, int]], device: torch.device | str = "cpu"
    ) -> Routing:
        """Routing for sequences packed end to end in one (1, N) row: ``(adapter, length)``
        each, in order. Sequence i owns tokens [sum of the lengths before it, + length)."""
        adapters = tuple(a for a, _ in sequences)
        routing = cls(adapters, tuple(dict.fromkeys(a for a in adapters if a)), torch.device(device))
        n_tokens = sum(n for _, n in sequences)
        routing.packed_tokens = n_tokens
        if routing.uniform:
            routing.segments(n_tokens)
            return routing
        ranges: dict[str, list[tuple[int, int]]] = {}
        start = 0
        for adapter, n in sequences:
            if adapter:
                ranges.setdefault(adapter, []).append((start, start + n))
            start += n
        found = {}
        for adapter, spans in ranges.items():
            first, last = spans[0][0], spans[-1][1]
            if sum(e - s for s, e in spans) == last - first:  # one run of tokens
                found[adapter] = Segment(first, last, torch.arange(first, last, device=routing.device), True)
            else:
                index_S = torch.cat([torch.arange(s, e) for s, e in spans]).to(routing.device)
                found[adapter] = Segment(first, last, index_S, False)
        routing._segments[n_tokens] = found
        return routing

    def segments(self, n_tokens: int) -> dict[str, Segment]:
        """adapter -> the tokens it owns in an input of ``n_tokens`` tokens.
        Raises if the rows cannot cover ``n_tokens`` (only asked by targeted layers)."""
        found = self._segments.get(n_tokens)
        if found is not None:
            return found
        B = len(self.row_adapters)
        if self.packed_tokens is not None and not self.uniform and n_tokens != self.packed_tokens:
            raise RuntimeError(f"LoRA routing covers {self.packed_tokens} packed tokens but the input has {n_tokens}")
        if self.uniform:
            everything = torch.arange(n_tokens, device=self.device)
            found = {a: Segment(0, n_tokens, everything, True) for a in self.adapters}  # whatever N
        elif B == 0 or n_tokens % B:
            raise RuntimeError(f"LoRA routing covers {B} rows but the layer's input has {n_tokens} tokens")
        else:
            found = {a: self._segment(a, n_tokens // B) for a in self.adapters}
        self._segments[n_tokens] = found
        return found

    def _segment(self, adapter: str, T: int) -> Segment:
        rows = [b for b, a in enumerate(self.row_adapters) if a == adapter]
        first, last = rows[0], rows[-1]
        if last - first + 1 == len(rows):  # one run of rows: one run of tokens
            return Segment(first * T, (last + 1) * T, torch.arange(first * T, (last + 1) * T, device=self.device), True)
        rows_R = torch.tensor(rows, dtype=torch.long, device=self.device)
        index_S = (rows_R[:, None] * T + torch.arange(T, device=self.device)).reshape(-1)  # (R*T,)
        return Segment(first * T, (last + 1) * T, index_S, False)


_routing: ContextVar[Routing | None] = ContextVar("thinker_lora_routing", default=None)


def current_routing() -> Routing | None:
    """The routing of the forward running on this thread (None: no adapters anywhere)."""
    return _routing.get()


@contextmanager
def use_adapters(
    row_adapters: Sequence[str | None] | Routing, device: torch.device | str = "cpu"
) -> Iterator[Routing]:
    """Route this thread's forward calls: row i uses ``row_adapters[i]`` (None: base)."""
    routing = row_adapters if isinstance(row_adapters, Routing) else Routing.build(row_adapters, device)
    token = _routing.set(routing)
    try:
        yield routing
    finally:
        _routing.reset(token)
