"""Benchmark: what many registered adapters cost, and what moving one in and out costs.

Creates --adapters adapters on one model in this process, then reports their size and memory,
the time per add_lora, and the time of a training step on an adapter that is resident against
one that was just moved out to CPU memory (MAX_RESIDENT_ADAPTERS, backend/lora/residency.py).

    python bench_adapters.py                                  # 200 adapters on the SmolLM2-135M architecture
    python bench_adapters.py --model builtin-tiny --adapters 1000
    python bench_adapters.py --device cuda --adapters 1000    # on a GPU: moves really cross the bus
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import statistics
import time

import torch
from rich.table import Table

from backend import AdamParams, FwdBwdRequest
from backend.train.examples import Example
from bench.bench import load
from thinker.obs.progress import make_console


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (random weights) or builtin-tiny")
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resident", type=int, default=16, help="MAX_RESIDENT_ADAPTERS for the run")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--cache-dir", default="bench_results/models")
    args = parser.parse_args()

    backend = load(args.model, args.cache_dir, args.device, max_resident_adapters=args.resident)
    before, started = rss_mb(), time.perf_counter()
    ids = [backend.add_lora(args.rank, 2.0 * args.rank, None, i)["model_id"] for i in range(args.adapters)]
    per_add_ms = 1000 * (time.perf_counter() - started) / args.adapters
    added_mb = rss_mb() - before
    params = backend.adapters.get(ids[0]).describe()["num_parameters"]

    tokens = torch.randint(0, backend.vocab_size, (129,), generator=torch.Generator().manual_seed(0)).tolist()
    example = Example.from_sequence(tokens, [1.0] * 129)

    def step(adapter_id: str) -> float:
        started = time.perf_counter()
        backend.forward_backward_one(FwdBwdRequest(adapter_id, [example]))
        backend.optim_step(adapter_id, AdamParams())
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started)

    resident, moved = [], []
    for i in range(5):
        step(ids[-1])
        resident.append(step(ids[-1]))  # stays resident: it was just used
        moved_id = ids[i]  # long out of the accelerator (only the newest --resident stay)
        moved.append(step(moved_id))
    table = Table(title=f"{args.adapters} adapters of rank {args.rank} on {args.model} ({backend.device})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("parameters per adapter", f"{params / 1e6:.2f} M")
    table.add_row("host memory per adapter (RSS)", f"{added_mb / args.adapters:.1f} MB")
    table.add_row("add_lora", f"{per_add_ms:.1f} ms")
    table.add_row("train step (128 tokens), resident adapter, median of 5", f"{statistics.median(resident):.1f} ms")
    table.add_row("train step, adapter moved back in first, median of 5", f"{statistics.median(moved):.1f} ms")
    table.add_row("adapters resident / offloads / reloads",
                  f"{backend.residency.resident} / {backend.residency.offloads} / {backend.residency.reloads}")
    make_console().print(table)
    backend.close()


if __name__ == "__main__":
    main()
