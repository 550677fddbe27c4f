"""Benchmark: the fused multi-adapter AdamW step, and a fused pass without gradient clones.

Side by side in one process, on the SmolLM2-135M architecture (random weights, every linear
layer adapted) at rank 8 and 32:

- one optimizer step for 1 adapter and for 16 adapters, old (each adapter's own AdamW in a
  loop, a device sync per gradient norm: the code before backend/lora/optimizer.py) against
  new (``HFBackend.optim_steps``: each adapter's tensors are views into flat buffers,
  backend/lora/flat.py, so 16 adapters are one norm, one counter add and one fused AdamW
  launch over 16 flat tensors); the ratio 16 vs 1 is the one to watch (target <= 3x on an
  accelerator, where launches and syncs, not bytes, dominate). Printed beside the times: the
  aten ops each step dispatches (top level, as a TorchDispatchMode sees them: a foreach op over
  N tensors is one; and every aten op the profiler records, nested ones included), the bytes
  an AdamW step must move and the GB/s that makes, against a plain copy's GB/s here (on a CPU
  the step is bound by memory bandwidth: 16 adapters move 16x the bytes);
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
from backend.train.fused_pass import _accumulate
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


def count_ops(fn: Callable[[], object], prepare: Callable[[], object]) -> tuple[int, int]:
    """(top-level aten ops ``fn`` dispatches, every aten op the profiler records in it)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    prepare()
    with Count():
        fn()
    prepare()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    recorded = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return Count.ops, recorded


def copy_gbps(device: torch.device, megabytes: int = 512) -> float:
    """What a plain large copy achieves here (read + write), GB/s: the bandwidth reference."""
    src = torch.empty(megabytes * 2**18, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(numel: int, clip: bool) -> int:
    """Bytes one AdamW step over ``numel`` fp32 parameters must move at the least: the norm
    reads the gradient (4), clipping reads and writes it (8), AdamW reads the weight, the
    gradient and both moments and writes the weight and both moments (28)."""
    return numel * (4 + (8 if clip else 0) + 28)


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
    reference = copy_gbps(backend.device)
    print(f"\nrank {rank}: {numel / 1e6:.2f}M parameters in {tensors} tensors per adapter; "
          f"a plain copy here: {reference:.1f} GB/s")
    print(f"{'adapters':>8} {'old loop (ms)':>14} {'fused (ms)':>11} {'old/fused':>9}   AdamW launches old/new"
          f"   aten ops old/new (top level; all)   fused: MB moved, GB/s")
    results = {}
    for n in (1, 16):
        chosen = ids[:n]

        def prepare(chosen=chosen) -> None:
            for a in chosen:  # fresh gradients, put where a pass puts them (into the flat buffer)
                params = backend.adapters.get(a).params
                for p in params:
                    p.grad = None
                _accumulate(params, [g.clone() for g in grads[a]])

        def old_loop(chosen=chosen) -> None:
            for a in chosen:
                old_optim_step(backend, a, adam)

        def fused(chosen=chosen) -> None:
            backend.optim_steps([(a, adam) for a in chosen])

        old, new = timed([old_loop, fused], prepare, backend.device, reps)
        results[n] = (old, new)
        launches = (count_launches(old_loop, prepare), count_launches(fused, prepare))
        (old_top, old_all), (new_top, new_all) = count_ops(old_loop, prepare), count_ops(fused, prepare)
        moved = step_bytes(n * numel, clip=True)
        print(f"{n:>8} {1000 * old:>14.2f} {1000 * new:>11.2f} {old / new:>8.2f}x   {launches[0]:>6}/{launches[1]:<6}"
              f"   {old_top:>6}/{new_top:<4} ; {old_all:>6}/{new_all:<6}            "
              f"{moved / 1e6:>7.0f}, {moved / new / 1e9:.1f}")
    (old1, new1), (old16, new16) = results[1], results[16]
    floor16, floor1 = (step_bytes(n * numel, True) / reference / 1e6 for n in (16, 1))
    print(f"16 vs 1 adapter: old loop {old16 / old1:.2f}x, fused {new16 / new1:.2f}x (target <= 3x); "
          f"16x the bytes: at the copy's bandwidth 16 adapters need at least {floor16:.1f} ms, one {floor1:.2f} ms")
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
