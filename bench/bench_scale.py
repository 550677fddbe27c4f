"""Fused against sequential training steps as the number of adapters N grows, with MFU and
peak memory: what bench/gpu.sh runs on a lent GPU.

For each model and N: N requests on N adapters (ranks 8, 16, 32, 64 cycled), one sequence
each, lengths spread over --min-len..--max-len; the fused step (one pass, one optimizer job)
and the same requests one after another, warmed up, taking turns, median of --reps. Peak
memory: torch.cuda.max_memory_allocated over each mode on a GPU, the peak RSS on CPU.

    python bench/bench_scale.py --device cuda                        # smollm2-135m and llama-1b, N 1,4,16,64
    python bench/bench_scale.py --device cpu --quick                 # a smoke run: builtin-tiny, N 1,4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import time

import torch

from bench.bench import load
from bench.flops import ModelShape, device_peak_tflops, measured_matmul_tflops, rows_of, training_flops
from bench.workload import fused_step, machine_line, make_requests, real_tokens, sequential_steps, side_by_side, spread
from thinker.core.config import Config

RANKS = (8, 16, 32, 64)


def peak_memory(device: torch.device, fn) -> int:
    """Bytes: the allocator's high-water mark during ``fn`` on a GPU; on CPU the RSS's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux >= 4.0)
    fn()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024


def one_n(backend, n: int, args, peak: float) -> str:
    ranks = [RANKS[i % len(RANKS)] for i in range(n)]
    ids, requests = make_requests(backend, ranks, spread(n, args.min_len, args.max_len))
    modes = {"fused": lambda: fused_step(backend, requests), "sequential": lambda: sequential_steps(backend, requests)}
    memory = {name: backend.compute.run(peak_memory, backend.device, fn) for name, fn in modes.items()}  # warm-up too
    seconds = side_by_side(modes, args.reps, backend.device)
    flops = training_flops(ModelShape.of(backend.model), rows_of(backend, requests))
    for adapter_id in ids:
        backend.adapters.remove(adapter_id)
    gib = 1024**3
    return (
        f"| {n} | {real_tokens(requests)} | {seconds['fused']:.3f} | {seconds['sequential']:.3f} | "
        f"{seconds['sequential'] / seconds['fused']:.2f}x | {flops / seconds['fused'] / (peak * 1e12):.1%} | "
        f"{flops / seconds['sequential'] / (peak * 1e12):.1%} | {memory['fused'] / gib:.2f} | "
        f"{memory['sequential'] / gib:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-1b")
    parser.add_argument("--users", default="1,4,16,64", help="comma-separated N values")
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="builtin-tiny, N 1 and 4, 16..64 tokens")
    parser.add_argument("--device", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: datasheet (GPU) or measured")
    parser.add_argument("--cache-dir", default=Config().thinker_cache_dir)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    if args.quick:
        args.models, args.users, args.min_len, args.max_len = "builtin-tiny", "1,4", 16, 64
    lines = [f"machine: {machine_line()}"]
    print(lines[0], flush=True)
    for model in args.models.split(","):
        started = time.perf_counter()
        print(f"loading {model}...", flush=True)
        backend = load(model, args.cache_dir, args.device, sampler=False)
        matmul = backend.compute.run(measured_matmul_tflops, backend.device)
        peak = args.peak_tflops or device_peak_tflops(backend.device) or matmul
        name = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else "cpu"
        lines += [
            "",
            f"### {model} on {name} ({backend.loaded.dtype}); MFU against {peak:.3g} TFLOP/s "
            f"(a big matmul achieves {matmul:.3g})",
            "",
            "| N | real tokens | fused s | sequential s | sequential / fused | MFU fused | MFU sequential "
            "| peak GiB fused | peak GiB sequential |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        print("\n".join(lines[-5:]), flush=True)
        for n in (int(x) for x in args.users.split(",")):
            lines.append(one_n(backend, n, args, peak))
            print(lines[-1], flush=True)
        backend.close()
        print(f"({model}: {time.perf_counter() - started:.0f} s)", flush=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scale.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'scale.md'}")


if __name__ == "__main__":
    main()
