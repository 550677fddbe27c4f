"""The LoRA layer, old (row-routed) vs new (token segments), side by side in one process.

Measures, at a wide shape (hidden 2048, 2 blocks of 4 square projections, 16 adapters of
mixed ranks up to 64, one row each):

- bytes autograd saves for backward in one fused forward (``saved_tensors_hooks``;
  storages counted once; the base and adapter weights themselves left out: they exist
  anyway, so what remains is what the pass allocated and autograd holds);
- time of one layer's forward+backward, and of a no-grad forward of one token per row
  (a decode step), median of several reps after a warm-up;
- the same layer done with ``torch.nn.functional.grouped_mm``, one call per distinct rank
  (the adapters' weights stacked per call), to justify the per-segment loop.

The old layer is kept below as ``old_forward``: the row-routed code this replaced (stack
every adapter's A/B padded to the largest rank, gather one copy per row, batched matmul).

    OMP_NUM_THREADS=1 python3 bench/bench_lora_layer.py [--hidden 2048] [--tokens 32]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from backend.lora.layer import MultiLoraLinear  # noqa: E402
from backend.lora.routing import Routing, use_adapters  # noqa: E402

RANKS = (8, 16, 32, 64)


def old_forward(layer: MultiLoraLinear, x_BTI: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """The row-routed layer this replaced (backend/lora/layer.py before issue 13)."""
    out = layer.base(x_BTI)
    distinct = list(dict.fromkeys(a for a in rows if a))
    present = [a for a in distinct if a in layer.lora_A]
    rank = max(layer.lora_A[a].shape[0] for a in present)
    dtype = x_BTI.dtype
    zeros_a = x_BTI.new_zeros(rank, layer.in_features)
    zeros_b = x_BTI.new_zeros(layer.out_features, rank)
    a_list, b_list = [zeros_a], [zeros_b]
    for adapter_id in distinct:
        a = layer.lora_A[adapter_id]
        pad = rank - a.shape[0]
        b_scaled = layer.lora_B[adapter_id].to(dtype) * layer.scaling[adapter_id]
        a_list.append(F.pad(a.to(dtype), (0, 0, 0, pad)))
        b_list.append(F.pad(b_scaled, (0, pad)))
    slot_of = {a: i + 1 for i, a in enumerate(distinct)}
    slots_B = torch.tensor([slot_of[a] if a else 0 for a in rows])
    a_BRI, b_BOR = torch.stack(a_list)[slots_B], torch.stack(b_list)[slots_B]  # a copy per row
    h_BTR = torch.bmm(x_BTI, a_BRI.transpose(1, 2))
    return torch.baddbmm(out, h_BTR, b_BOR.transpose(1, 2))


def grouped_forward(layer: MultiLoraLinear, x_BTI: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """The same sum by grouped_mm, one call per distinct rank; rows sorted by rank here
    (a real layer would also permute tokens), weights stacked per call."""
    B, T, _ = x_BTI.shape
    out_NO = layer.base(x_BTI).view(B * T, -1)
    x_NI = x_BTI.reshape(B * T, -1)
    start = 0
    by_rank: dict[int, list[int]] = {}
    for b, a in enumerate(rows):
        by_rank.setdefault(layer.lora_A[a].shape[0], []).append(b)
    deltas = []
    for _rank, members in sorted(by_rank.items()):
        assert members == list(range(members[0], members[0] + len(members))), "rows must be sorted by rank"
        a_GIR = torch.stack([layer.lora_A[rows[b]].t() for b in members])  # (G, in, r)
        b_GRO = torch.stack([layer.lora_B[rows[b]].t() * layer.scaling[rows[b]] for b in members])  # (G, r, out)
        offs = torch.arange(1, len(members) + 1, dtype=torch.int32) * T
        x_gI = x_NI[start : start + len(members) * T]
        deltas.append(F.grouped_mm(F.grouped_mm(x_gI, a_GIR, offs=offs), b_GRO, offs=offs))
        start += len(members) * T
    return out_NO + torch.cat(deltas)


def make_layer(hidden: int, adapters: list[str], seed: int, first_rank: int | None = None) -> MultiLoraLinear:
    """A square projection with ``adapters`` of ranks cycling through RANKS (the first one
    of rank ``first_rank`` if given)."""
    torch.manual_seed(seed)
    layer = MultiLoraLinear(nn.Linear(hidden, hidden, bias=False).requires_grad_(False), f"proj{seed}")
    generator = torch.Generator().manual_seed(seed)
    for i, adapter_id in enumerate(adapters):
        rank = first_rank if i == 0 and first_rank else RANKS[i % len(RANKS)]
        layer.add_adapter(adapter_id, rank, 32.0, generator)
        with torch.no_grad():
            layer.lora_B[adapter_id].normal_(std=0.01, generator=generator)
    return layer


def saved_bytes(run, frozen: set[int]) -> int:
    """Bytes of distinct storages autograd saves for backward during ``run()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(seen.values())


def timed(fns, reps: int) -> list[float]:
    """Median seconds of each of ``fns``, run in turn within every rep (a busy machine then
    slows them alike), after one warm-up each."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, mine in zip(fns, samples, strict=True):
            started = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - started)
    return [statistics.median(mine) for mine in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row (one row per adapter)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    H, T = args.hidden, args.tokens
    adapters = [f"a{i}" for i in range(args.adapters)]
    rows = list(adapters)  # one row each, in order: every adapter's tokens form one segment
    print(f"hidden {H}, {args.blocks} blocks x 4 projections, {len(adapters)} adapters (ranks {RANKS}), "
          f"{len(rows)} rows x {T} tokens")
    for first_rank in (256, None):  # the mixed-rank layers last: the timings use them
        blocks = [[make_layer(H, adapters, 4 * k + j, first_rank) for j in range(4)] for k in range(args.blocks)]
        base_bytes, old_bytes, new_bytes = _compare_saved_bytes(blocks, rows, T, H)
        label = "" if first_rank is None else f" (a0 at rank {first_rank})"
        print(f"saved for backward, one fused pass{label}: base model alone {base_bytes / 2**20:6.1f} MiB   "
              f"old {old_bytes / 2**20:6.1f} MiB   new {new_bytes / 2**20:6.1f} MiB   "
              f"(LoRA's share: old {(old_bytes - base_bytes) / 2**20:.1f}, new {(new_bytes - base_bytes) / 2**20:.1f})")
    _compare_times(blocks[0][0], rows, T, H, args.reps)


def _compare_saved_bytes(blocks, rows, T: int, H: int) -> tuple[int, ...]:
    # Weights exist whatever the graph keeps: count only what the pass itself allocates.
    frozen = {
        p.untyped_storage().data_ptr()
        for block in blocks
        for layer in block
        for p in [layer.base.weight, *layer.lora_A.values(), *layer.lora_B.values()]
    }
    x_BTH = torch.randn(len(rows), T, H, requires_grad=True)  # so the base model alone has a backward too

    def fused_pass(old: bool | None):  # None: the base model alone (no routing)
        def run():
            h = x_BTH
            for block in blocks:
                q, k, v, o = (old_forward(p, h, rows) if old else p(h) for p in block)
                h = h + o * torch.sigmoid(q + k) * v  # something that keeps every output
            return h.square().mean()

        if old is not False:
            return run
        return lambda: _routed(rows, T, run)

    return tuple(saved_bytes(fused_pass(old), frozen) for old in (None, True, False))


def _compare_times(layer: MultiLoraLinear, rows: list[str], T: int, H: int, reps: int) -> None:
    x_BTH = torch.randn(len(rows), T, H)
    with torch.no_grad():  # the three compute the same thing
        want = old_forward(layer, x_BTH, rows)
        by_rank = sorted(rows, key=lambda a: layer.lora_A[a].shape[0])
        order = [rows.index(a) for a in by_rank]
        torch.testing.assert_close(_routed(rows, T, lambda: layer(x_BTH)), want, rtol=1e-4, atol=1e-4)
        grouped = grouped_forward(layer, x_BTH[order], by_rank).view(len(rows), T, H)
        torch.testing.assert_close(grouped, want[order], rtol=1e-4, atol=1e-4)
    x_leaf = x_BTH.clone().requires_grad_()

    grad_BTH = torch.randn(len(rows), T, H)  # a dense incoming gradient (grouped_mm's CPU backward wants one)

    def base_fb():
        layer.base(x_leaf).backward(grad_BTH)

    def old_fb():
        old_forward(layer, x_leaf, rows).backward(grad_BTH)

    def new_fb():
        _routed(rows, T, lambda: layer(x_leaf)).backward(grad_BTH)

    def grouped_fb():
        grouped_forward(layer, x_leaf, by_rank).view(len(rows), T, H).backward(grad_BTH)

    t_base, t_old, t_new, t_grouped = timed([base_fb, old_fb, new_fb, grouped_fb], reps)
    print(f"one layer forward+backward: base alone {t_base * 1e3:7.1f} ms   old {t_old * 1e3:7.1f} ms   "
          f"new (segments) {t_new * 1e3:7.1f} ms   grouped_mm by rank {t_grouped * 1e3:7.1f} ms")

    x_step = torch.randn(len(rows), 1, H)  # a decode step: one token per row
    with torch.no_grad():
        t_old_dec, t_new_dec = timed(
            [lambda: old_forward(layer, x_step, rows), lambda: _routed(rows, 1, lambda: layer(x_step))], reps * 4
        )
    print(f"one layer, no-grad decode step:  old {t_old_dec * 1e3:7.2f} ms   new {t_new_dec * 1e3:7.2f} ms")


def _routed(rows: list[str | None], tokens_per_row: int, run):
    with use_adapters(Routing.build(rows, tokens_per_row=tokens_per_row)):
        return run()


if __name__ == "__main__":
    main()
