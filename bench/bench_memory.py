"""What a fused pass of many adapters costs in memory over one adapter on the same tokens.

Each measurement runs in a fresh process (its own peak RSS, nothing left from the other):
load the model, create the adapters, then one forward+backward, either fused (request i on
adapter i) or of every sequence on adapter 0. It reports

- saved-for-backward bytes: every tensor autograd keeps for the backward
  (torch.autograd.graph.saved_tensors_hooks), unique storages, parameters left out;
- peak RSS growth during the pass: the kernel's high-water mark (VmHWM) reset just before
  it (/proc/self/clear_refs), minus the RSS then; on a GPU, torch.cuda.max_memory_allocated
  growth instead;
- the gradient bytes the pass leaves on the adapters (each trained adapter needs its own).

    python bench/bench_memory.py                        # llama-1b's width, 2 layers, 16 adapters of rank 64
    python bench/bench_memory.py --mode fused --json    # one measurement, in this process
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import gc
import json
import os
import subprocess

import torch

from bench.workload import check, make_requests, one_adapter_request, padded_tokens, real_tokens, spread
from thinker.core.config import Config


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_one(args) -> dict:
    """One pass in this process; see the module docstring."""
    from bench.bench import load

    backend = load(args.model, args.cache_dir, args.device, layers=args.layers, sampler=False)
    lengths = spread(args.adapters, args.min_len, args.max_len)
    ids, requests = make_requests(backend, [args.rank] * args.adapters, lengths)
    batch = requests if args.mode == "fused" else [one_adapter_request(requests)]
    params = {p.untyped_storage().data_ptr() for p in backend.model.parameters()}
    for adapter_id in ids:
        params |= {p.untyped_storage().data_ptr() for p in backend.adapters.get(adapter_id).params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def run_pass() -> dict:
        # Weights may be mapped from the model file and paged in on first use: read them all
        # now, or the head's pages would count as memory the pass took.
        for p in backend.model.parameters():
            float(p.detach().sum())
        gc.collect()
        cuda = backend.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        resettable = _reset_peak_rss()
        rss_kb = _status_kb("VmRSS")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            check(backend.forward_backward(batch))
        if cuda:
            torch.cuda.synchronize()
            growth = torch.cuda.max_memory_allocated() - before
        else:
            growth = (_status_kb("VmHWM") - rss_kb) * 1024 if resettable else None
        grads = sum(p.grad.nbytes for a in ids for p in backend.adapters.get(a).params if p.grad is not None)
        return {"peak_growth_bytes": growth, "rss_before_bytes": rss_kb * 1024, "grad_bytes": grads}

    # The saved-tensor hooks are per thread: install them where the pass runs.
    result = backend.compute.run(run_pass)
    backend.close()
    return {
        "mode": args.mode,
        "saved_bytes": sum(saved.values()),
        "real_tokens": real_tokens(requests),
        "padded_tokens": padded_tokens(requests),
        **result,
    }


def measure(args) -> dict[str, dict]:
    """Both modes, each in a fresh process: {"fused": {...}, "one": {...}}."""
    results = {}
    for mode in ("fused", "one"):
        argv = [sys.executable, str(Path(__file__).resolve()), "--json", "--mode", mode,
                "--model", args.model, "--adapters", str(args.adapters), "--rank", str(args.rank),
                "--min-len", str(args.min_len), "--max-len", str(args.max_len), "--cache-dir", args.cache_dir]
        if args.layers is not None:
            argv += ["--layers", str(args.layers)]
        if args.device:
            argv += ["--device", args.device]
        done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement ({mode}) failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def lines(memory: dict[str, dict], args) -> list[str]:
    """The figures, one line each, with the fused / one ratios."""
    fused, one = memory["fused"], memory["one"]
    mb = 1024 * 1024
    shape = args.model + (f" with {args.layers} layers" if args.layers and args.model != "builtin-tiny" else "")
    out = [
        f"memory: {shape}, {args.adapters} adapters of rank {args.rank}, one sequence each, "
        f"{fused['real_tokens']} real / {fused['padded_tokens']} padded tokens, forward+backward",
        f"  saved for backward: fused {fused['saved_bytes'] / mb:.1f} MB, one adapter {one['saved_bytes'] / mb:.1f} MB"
        f" -> fused/one {fused['saved_bytes'] / one['saved_bytes']:.3f}",
    ]
    grown, grown_one = fused["peak_growth_bytes"], one["peak_growth_bytes"]
    if grown is not None and grown_one:
        out.append(
            f"  peak memory growth in the pass: fused {grown / mb:.1f} MB, one adapter {grown_one / mb:.1f} MB"
            f" -> fused/one {grown / grown_one:.3f}"
            f" (RSS before: {fused['rss_before_bytes'] / mb:.0f} / {one['rss_before_bytes'] / mb:.0f} MB)"
        )
        rest, rest_one = grown - fused["grad_bytes"], grown_one - one["grad_bytes"]
        out.append(
            f"  the same less the adapter gradients: fused {rest / mb:.1f} MB, one adapter {rest_one / mb:.1f} MB"
            f" -> fused/one {rest / rest_one:.3f}"
        )
    out.append(
        f"  adapter gradients left by the pass: fused {fused['grad_bytes'] / mb:.1f} MB, "
        f"one adapter {one['grad_bytes'] / mb:.1f} MB (each trained adapter needs its own)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", help="llama-1b, smollm2-135m or builtin-tiny")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (the model's width stays)")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--mode", choices=("fused", "one"), default=None, help="one measurement, here")
    parser.add_argument("--json", action="store_true", help="print the measurement as one JSON line")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", default=Config().thinker_cache_dir)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure_one(args)))
        return
    for line in lines(measure(args), args):
        print(line)


if __name__ == "__main__":
    main()
