"""Performance bars of the fused multi-adapter step, measured side by side in one run.

On the SmolLM2-135M architecture (random weights, offline), N requests on N adapters of
ranks 8, 16, 32, 64 (cycled), one sequence each, lengths spread from --min-len to --max-len:

  (a) fused: one forward+backward of all N requests, then all N optimizer steps (one job);
  (b) one adapter: every sequence of (a) as one request on adapter 0, and its one step;
  (c) sequential: each request alone, its pass then its step, one after another.

Ratios a/b (bar: <= 1.05) and c/a (bar: >= 1), with the real and the padded token counts
(padding is computed, and wasted). Then the optimizer: one step of 16 adapters against one
(bar: <= 3x); the model FLOPs utilisation of (a), (b), (c) (bench/flops.py says what counts);
and memory at a wide shape, each measurement in a fresh process (bench/bench_memory.py).
Every mode is warmed up first (the mixed-adapter path too), and the modes take turns in
each of --reps repetitions; the figures are medians.

    python bench/bench_fused.py                       # about 5 minutes on an idle 2-core CPU
    python bench/bench_fused.py --peak-tflops 989 --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import time
from types import SimpleNamespace

from bench import bench_memory
from bench.bench import load
from bench.flops import ModelShape, device_peak_tflops, measured_matmul_tflops, rows_of, training_flops
from bench.workload import (
    ADAM,
    check,
    fused_step,
    machine_line,
    make_requests,
    one_adapter_request,
    one_adapter_step,
    padded_tokens,
    real_tokens,
    sequential_steps,
    side_by_side,
    spread,
)
from thinker.core.config import Config

RANKS = (8, 16, 32, 64)


def say(lines: list[str], line: str) -> None:
    """Print a result line now and keep it for the markdown file."""
    print(line, flush=True)
    lines.append(line)


def step_bars(backend, args, peak: float, out: list[str]) -> None:
    """(a) fused, (b) one adapter, (c) sequential; see the module docstring."""
    ranks = [RANKS[i % len(RANKS)] for i in range(args.adapters)]
    lengths = spread(args.adapters, args.min_len, args.max_len)
    ids, requests = make_requests(backend, ranks, lengths)
    one = one_adapter_request(requests)
    modes = {
        "fused": lambda: fused_step(backend, requests),
        "one_adapter": lambda: one_adapter_step(backend, one),
        "sequential": lambda: sequential_steps(backend, requests),
    }
    warmup = args.warmup if args.warmup != "auto" else ("full" if backend.device.type == "cuda" else "short")
    print(f"warm-up: every mode once ({warmup})...", flush=True)
    if warmup == "short":  # the same paths (mixed routing included) on 16-token sequences
        _, short = make_requests(backend, ranks, [16] * args.adapters, seed=100)
        fused_step(backend, short)
        one_adapter_step(backend, one_adapter_request(short))
        sequential_steps(backend, short)
        for request in short:
            backend.adapters.remove(request.adapter_id)
    else:
        for fn in modes.values():
            fn()
    print(f"timing {args.reps} rounds of fused, one adapter, sequential...", flush=True)
    cpu: dict[str, float] = {}
    seconds = side_by_side(modes, args.reps, backend.device, cpu)
    shape = ModelShape.of(backend.model)
    fused_flops = training_flops(shape, rows_of(backend, requests))
    one_flops = training_flops(shape, rows_of(backend, [one]))
    say(out, f"step: {args.model}, {args.adapters} requests on adapters of ranks {ranks}, one sequence each, "
             f"lengths {lengths}; {warmup} warm-up, median of {args.reps}")
    say(out, f"  tokens: {real_tokens(requests)} real, {padded_tokens(requests)} padded in one pass "
             f"({padded_tokens(requests) / real_tokens(requests):.2f}x); loss on the second half of each sequence")
    say(out, f"  the fused pass computes {computed_positions(backend, lengths)}")
    flops = {"fused": fused_flops, "one_adapter": one_flops, "sequential": fused_flops}
    # (a) trains every adapter at its own rank, (b) only the first's: more work, not overhead.
    say(out, f"  useful work: (a) and (c) {fused_flops / 1e12:.3f} TFLOP, (b) {one_flops / 1e12:.3f} TFLOP "
             f"-> a/b of the work {fused_flops / one_flops:.3f}")
    for name, label in (("fused", "(a) fused step"), ("one_adapter", f"(b) one adapter (rank {ranks[0]}), same tokens"),
                        ("sequential", "(c) sequential, one request after another")):
        mfu = flops[name] / seconds[name] / (peak * 1e12)
        say(out, f"  {label}: {seconds[name]:.3f} s, {real_tokens(requests) / seconds[name]:.0f} real tok/s, "
                 f"MFU {mfu:.1%}")
    say(out, f"  a/b = {seconds['fused'] / seconds['one_adapter']:.3f} (bar <= 1.05), "
             f"c/a = {seconds['sequential'] / seconds['fused']:.3f} (bar >= 1)")
    # On a shared machine the wall time moves with the others' load; the CPU time less so.
    say(out, f"  process CPU time: (a) {cpu['fused']:.3f} s, (b) {cpu['one_adapter']:.3f} s, "
             f"(c) {cpu['sequential']:.3f} s -> a/b = {cpu['fused'] / cpu['one_adapter']:.3f}, "
             f"c/a = {cpu['sequential'] / cpu['fused']:.3f}")
    for adapter_id in ids:
        backend.adapters.remove(adapter_id)


def computed_positions(backend, lengths: list[int]) -> str:
    """What this tree's fused pass lays out for these sequences (backend/train/packing.py)."""
    from backend.train.packing import pack, packing_mode

    mode = backend.compute.run(packing_mode, backend.model)
    if mode == "varlen":
        return f"{sum(lengths)} positions: one packed row, attention cut per sequence (varlen)"
    if mode == "rows":
        rows = len(pack(lengths, "cpu").bins)
        return f"{rows * max(lengths)} positions: {rows} packed rows of {max(lengths)}"
    return f"{len(lengths) * max(lengths)} positions: padded rows"


def optimizer_bar(backend, args, out: list[str]) -> None:
    """One optimizer step of 16 adapters (one optim_steps job) against one adapter's."""
    n = args.optim_adapters
    ids, requests = make_requests(backend, [args.optim_rank] * n, [16] * n, seed=200)

    cpu: dict[int, list[float]] = {n: [], 1: []}

    def step(count: int) -> float:
        check(backend.forward_backward(requests[:count]))  # gradients to step on, untimed
        started, cpu_started = time.perf_counter(), time.process_time()
        check(backend.optim_steps([(a, ADAM) for a in ids[:count]]))
        cpu[count].append(time.process_time() - cpu_started)
        return time.perf_counter() - started

    step(n), step(1)  # warm-up: both paths, the moments allocated
    times = {n: [], 1: []}
    for _ in range(max(args.reps, 3)):
        for count in (n, 1):
            times[count].append(step(count))
    many, single = (sorted(times[c])[len(times[c]) // 2] for c in (n, 1))
    cpu_many, cpu_single = (sorted(cpu[c][2:])[len(cpu[c][2:]) // 2] for c in (n, 1))  # the warm-up left out
    params = backend.adapters.get(ids[0]).describe()["num_parameters"]
    say(out, f"optimizer: one step of {n} adapters {many * 1000:.1f} ms, of one {single * 1000:.1f} ms -> "
             f"{many / single:.2f}x (bar <= 3x); rank {args.optim_rank}, {params / 1e6:.2f} M parameters each; "
             f"process CPU time {cpu_many * 1000:.1f} ms vs {cpu_single * 1000:.1f} ms -> {cpu_many / cpu_single:.2f}x")
    for adapter_id in ids:
        backend.adapters.remove(adapter_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, llama-1b or builtin-tiny")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", choices=("auto", "full", "short"), default="auto",
                        help="full: every mode once at the measured size; short: on 16-token sequences, "
                             "which runs the same code paths (on CPU nothing is cached between passes "
                             "but the code's own state); auto: short on CPU, full on a GPU (its allocator "
                             "keeps what the first full-size pass grew)")
    parser.add_argument("--optim-adapters", type=int, default=16)
    parser.add_argument("--optim-rank", type=int, default=16)
    parser.add_argument("--memory-model", default="llama-1b")
    parser.add_argument("--memory-layers", type=int, default=2)
    parser.add_argument("--memory-adapters", type=int, default=16)
    parser.add_argument("--memory-rank", type=int, default=64)
    parser.add_argument("--memory-max-len", type=int, default=128)
    parser.add_argument("--parts", default="memory,step,optimizer", help="which of memory, step, optimizer to run")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU (default: the GPU's datasheet bf16 peak; on CPU a measured fp32 matmul)")
    parser.add_argument("--cache-dir", default=Config().thinker_cache_dir)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    out: list[str] = []
    started = time.perf_counter()
    say(out, f"machine at start: {machine_line()}")

    parts = set(args.parts.split(","))
    if "memory" in parts:
        print("memory: two fresh processes...", flush=True)
        memory_args = SimpleNamespace(
            model=args.memory_model, layers=args.memory_layers, adapters=args.memory_adapters,
            rank=args.memory_rank, min_len=args.min_len, max_len=args.memory_max_len,
            cache_dir=args.cache_dir, device=args.device,
        )
        for line in bench_memory.lines(bench_memory.measure(memory_args), memory_args):
            say(out, line)

    print(f"loading {args.model}...", flush=True)
    backend = load(args.model, args.cache_dir, args.device, sampler=False)
    # The reference runs where the model runs (the compute thread on CPU) with its threads.
    matmul = backend.compute.run(measured_matmul_tflops, backend.device)
    peak = args.peak_tflops or device_peak_tflops(backend.device) or matmul
    source = "given" if args.peak_tflops else ("datasheet" if device_peak_tflops(backend.device) else "measured")
    say(out, f"peak for MFU: {peak:.3f} TFLOP/s ({source}); a big matmul here achieves {matmul:.3f} TFLOP/s")
    if "step" in parts:
        step_bars(backend, args, peak, out)
    if "optimizer" in parts:
        optimizer_bar(backend, args, out)
    backend.close()
    say(out, f"machine at end: {machine_line()}; {time.perf_counter() - started:.0f} s in all")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fused.md").write_text("\n".join(out) + "\n")
    print(f"wrote {folder / 'fused.md'}")


if __name__ == "__main__":
    main()
