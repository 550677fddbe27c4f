"""Per-expert LoRA on fused MoE experts (backend/lora/experts.py), side by side in one process.

One Qwen3-MoE experts layer (hidden 1024, expert intermediate 384, 32 experts, top-4), N
tokens split over A adapters (rank 16) by rows, timed as forward+backward (training) and
as a no-grad forward (sampling), median of several reps after a warm-up:

- ``eager``: the model's own forward (transformers' eager loop over hit experts), no LoRA:
  the floor;
- ``lora grouped``: the wrapper with every token on an adapter (grouped_mm for the base and
  for each adapter's shrink/expand);
- ``lora loop``: the same with grouped_mm switched off (one matmul per hit expert);
- ``one adapter``: every token on one adapter, the bar a fused call of A adapters on the
  same tokens is held to;
- ``sequential``: the A adapters' requests one after another (each alone), vs. ``fused``:
  all in one call;
- the bytes autograd saves for backward (``saved_tensors_hooks``, storages counted once,
  the base and adapter weights left out: saved views of weights that exist anyway) for the
  eager forward, one adapter, and the fused call.

    OMP_NUM_THREADS=1 python3 bench/bench_moe_lora.py [--tokens 512] [--adapters 4]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from backend.lora import experts as experts_module  # noqa: E402
from backend.lora.adapters import LiveAdapters  # noqa: E402
from backend.lora.routing import use_adapters  # noqa: E402


def build(hidden: int, inter: int, n_experts: int, top_k: int):
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=hidden, moe_intermediate_size=inter, num_experts=n_experts, num_experts_per_tok=top_k
    )
    module = Qwen3MoeExperts(config)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    holder = torch.nn.Module()
    holder.experts = module
    return holder


def medians_s(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns (so a busy spell on this
    shared machine hits them alike), after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves during ``fn``, leaving out those of
    ``params`` (saved views of weights that exist anyway)."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def no_grouped_mm(fn):
    def run():
        with mock.patch.object(experts_module, "_groupable", lambda x, w: False):
            fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    H, inter, E, K, A = 1024, 384, 32, 4, args.adapters
    holder = build(H, inter, E, K)
    layers = experts_module.wrap_experts(holder)
    registry = LiveAdapters(layers)
    ids = [f"a{i}" for i in range(A)]
    for i, adapter_id in enumerate(ids):
        adapter = registry.create(args.rank, 2.0 * args.rank, ["gate_up_proj", "down_proj"], i, adapter_id=adapter_id)
        with torch.no_grad():
            for p in adapter.params:
                p.normal_(std=0.02)
    N = args.tokens - args.tokens % A
    hidden_NH = torch.randn(N, H)
    weights_NK, index_NK = torch.topk(torch.softmax(torch.randn(N, E), -1), K, dim=-1)
    experts = holder.experts
    params = [p for a in ids for p in registry.get(a).params]

    def run(rows, h_NH, i_NK, w_NK, train: bool):
        with use_adapters(rows):
            if not train:
                with torch.no_grad():
                    return experts(h_NH, i_NK, w_NK)
            x = h_NH.detach().requires_grad_()
            experts(x, i_NK, w_NK).pow(2).mean().backward()
            for p in params:
                p.grad = None

    fused_rows = [a for a in ids for _ in range(1)]  # A rows of N/A tokens each

    def fused(train):
        return run(fused_rows, hidden_NH, index_NK, weights_NK, train)

    def sequential(train):
        n = N // A
        for r, adapter_id in enumerate(ids):
            part = slice(r * n, (r + 1) * n)
            run([adapter_id], hidden_NH[part], index_NK[part], weights_NK[part], train)

    def eager(train):
        x = hidden_NH.detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = type(experts).forward(experts, x, index_NK, weights_NK)
            if train:
                out.pow(2).mean().backward()

    def forward_only(rows):  # what a training forward leaves for backward, the LoRA masters apart
        with use_adapters(rows):
            return experts(hidden_NH.detach().requires_grad_(), index_NK, weights_NK)

    print(f"threads {torch.get_num_threads()}, N={N} tokens, H={H}, I={inter}, E={E}, top-{K}, "
          f"{A} adapters of rank {args.rank}")
    mib = 2**20
    weights = [*experts.parameters(), *params]
    eager_saved = saved_bytes(
        lambda: type(experts).forward(experts, hidden_NH.detach().requires_grad_(), index_NK, weights_NK), weights
    )
    one_saved = saved_bytes(lambda: forward_only([ids[0]] * A), weights)
    fused_saved = saved_bytes(lambda: forward_only(fused_rows), weights)
    print(f"saved for backward: eager (no LoRA) {eager_saved / mib:.1f} MiB | one adapter {one_saved / mib:.1f} MiB | "
          f"fused {fused_saved / mib:.1f} MiB (fused/one {fused_saved / one_saved:.3f})")
    for train in (True, False):
        label = "forward+backward" if train else "no-grad forward"
        m = medians_s(
            {
                "eager": lambda train=train: eager(train),
                "grouped": lambda train=train: fused(train),
                "loop": no_grouped_mm(lambda train=train: fused(train)),
                "one": lambda train=train: run([ids[0]] * A, hidden_NH, index_NK, weights_NK, train),
                "sequential": lambda train=train: sequential(train),
            },
            args.reps,
        )
        base, grouped, loop, one, seq = m["eager"], m["grouped"], m["loop"], m["one"], m["sequential"]
        print(f"{label}: eager (no LoRA) {base * 1e3:.1f} ms | lora grouped {grouped * 1e3:.1f} ms "
              f"({grouped / base:.2f}x eager) | lora loop {loop * 1e3:.1f} ms ({loop / grouped:.2f}x grouped) | "
              f"one adapter {one * 1e3:.1f} ms (fused/one {grouped / one:.2f}) | "
              f"sequential {seq * 1e3:.1f} ms (fused/sequential {grouped / seq:.2f})")


if __name__ == "__main__":
    main()
