"""Benchmark: the fused multi-adapter AdamW step, and a fused pass without gradient clones.

Side by side in one process, on the SmolLM2-135M architecture (random weights, every linear
layer adapted) at rank 8 and 32:

- one optimizer step for 1 adapter and for 16 adapters, old (each adapter's own AdamW in a
  loop, a device sync per gradient norm: the code before backend/lora/optimizer.py) against
  new (``HFBackend.optim_steps``: one norm pass and one sync for all, one fused AdamW launch);
  the ratio 16 vs 1 is the one to watch (target <= 3x on an accelerator, where launches and
  syncs, not bytes, dominate);
- a fused forward-backward of 4 requests on 4 adapters that already hold gradients, with and
  without the old pre-pass clone of every trained adapter's gradients.

    python bench/bench_optimizer.py                  # CPU (or cuda when available)
    python bench/bench_optimizer.py --device cuda --reps 20
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from backend import AdamParams, FwdBwdRequest, HFBackend
from backend.train.examples import Example
from bench.bench import load
from thinker.core.errors import BadRequestError


def old_optim_step(backend: HFBackend, adapter_id: str, adam: AdamParams) -> dict:
    """The per-adapter step as it was: its own AdamW, its own norm read back to the host."""
    adapter = backend.adapters.get(adapter_id)
    grads = [p.grad for p in adapter.params if p.grad is not None]
    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(grad_norm):
        raise BadRequestError("not finite")
    if adam.grad_clip_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(adapter.params, adam.grad_clip_norm, torch.tensor(grad_norm))
    for group in adapter.optimizer.param_groups:
        group.update(
            lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
        )
    adapter.optimizer.step()
    adapter.optimizer.zero_grad(set_to_none=True)
    adapter.step += 1
    return {"model_id": adapter_id, "step": adapter.step, "grad_norm": grad_norm}


def timed(fns: list[Callable[[], object]], prepare: Callable[[], object], device: torch.device, reps: int) -> list:
    """Median seconds of each of ``fns``, taken in turn rep by rep (so load on a shared machine
    falls on all alike), after one warm-up; ``prepare`` runs before each, untimed."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps + 1):
        for fn, fn_times in zip(fns, times, strict=True):
            prepare()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                fn_times.append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def count_launches(fn: Callable[[], object], prepare: Callable[[], object]) -> int:
    """How many fused AdamW kernel launches ``fn`` makes (on an accelerator each is a launch
    over its tensor list; the old loop also read each adapter's norm back: one sync each)."""
    real, calls = torch._fused_adamw_, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    prepare()
    torch._fused_adamw_ = counted
    try:
        fn()
    finally:
        torch._fused_adamw_ = real
    return len(calls)


def bench_steps(backend: HFBackend, rank: int, reps: int) -> None:
    ids = [backend.add_lora(rank, 2.0 * rank, None, 100 + i)["model_id"] for i in range(16)]
    generator = torch.Generator().manual_seed(rank)
    grads = {
        a: [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in backend.adapters.get(a).params]
        for a in ids
    }
    numel = sum(p.numel() for p in backend.adapters.get(ids[0]).params)
    tensors = len(backend.adapters.get(ids[0]).params)
    adam = AdamParams(learning_rate=1e-4, grad_clip_norm=1.0)
    print(f"\nrank {rank}: {numel / 1e6:.2f}M parameters in {tensors} tensors per adapter")
    print(f"{'adapters':>8} {'old loop (ms)':>14} {'fused (ms)':>11} {'old/fused':>9}   AdamW launches old/new")
    results = {}
    for n in (1, 16):
        chosen = ids[:n]

        def prepare(chosen=chosen) -> None:
            for a in chosen:  # fresh gradients (references, no copy): both paths drop them
                for p, g in zip(backend.adapters.get(a).params, grads[a], strict=True):
                    p.grad = g.clone()

        def old_loop(chosen=chosen) -> None:
            for a in chosen:
                old_optim_step(backend, a, adam)

        def fused(chosen=chosen) -> None:
            backend.optim_steps([(a, adam) for a in chosen])

        old, new = timed([old_loop, fused], prepare, backend.device, reps)
        results[n] = (old, new)
        launches = (count_launches(old_loop, prepare), count_launches(fused, prepare))
        print(f"{n:>8} {1000 * old:>14.2f} {1000 * new:>11.2f} {old / new:>8.2f}x   {launches[0]}/{launches[1]}")
    (old1, new1), (old16, new16) = results[1], results[16]
    print(f"16 vs 1 adapter: old loop {old16 / old1:.2f}x, fused {new16 / new1:.2f}x (target <= 3x)")
    for a in ids:
        backend.remove_adapter(a)


def bench_pass(backend: HFBackend, rank: int, reps: int) -> None:
    ids = [backend.add_lora(rank, 2.0 * rank, None, 200 + i)["model_id"] for i in range(4)]
    generator = torch.Generator().manual_seed(0)
    requests = []
    for a in ids:
        tokens = torch.randint(0, backend.vocab_size, (65,), generator=generator).tolist()
        requests.append(FwdBwdRequest(a, [Example.from_sequence(tokens, [1.0] * 65)]))
    backend.forward_backward(requests)  # every adapter now holds an accumulated gradient
    params = [p for a in ids for p in backend.adapters.get(a).params]
    clones: list = []

    def old_clones() -> None:  # what every pass did before it ran: a copy to roll back to
        clones[:] = [None if p.grad is None else p.grad.clone() for p in params]

    def nothing() -> None:
        clones.clear()

    def with_old_clones() -> None:
        old_clones()
        backend.forward_backward(requests)

    passes = [lambda: backend.forward_backward(requests), with_old_clones, old_clones]
    new, with_clones, clone_only = timed(passes, nothing, backend.device, reps)
    print(
        f"\nfused pass, 4 requests x 64 tokens, rank {rank}: {1000 * new:.1f} ms; with the old gradient clones "
        f"{1000 * with_clones:.1f} ms (the clones alone {1000 * clone_only:.2f} ms, "
        f"{100 * clone_only / new:.1f}% of the pass)"
    )
    for a in ids:
        backend.remove_adapter(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (random weights) or builtin-tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cache-dir", default="bench_results/models")
    args = parser.parse_args()
    backend = load(args.model, args.cache_dir, args.device, max_resident_adapters=64)
    print(f"{args.model} on {backend.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    try:
        for rank in (int(r) for r in args.ranks.split(",")):
            backend.compute.run(bench_steps, backend, rank, args.reps)
            backend.compute.run(bench_pass, backend, rank, args.reps)
    finally:
        backend.close()


if __name__ == "__main__":
    main()
