"""Benchmark: torch's thread settings on a quiet CPU and beside busy processes, side by side.

For each setting (TORCH_THREADS, optionally with an OMP_WAIT_POLICY: both must be fixed
before torch starts, so each setting runs in a child process of its own) and each model, it
times a fused training step of --adapters adapters (one --seq-len sequence each, forward,
backward and Adam) and a decode of --adapters x --samples rows (--samples of one prompt per
adapter) x --new-tokens tokens through the shared
decode loop, with the machine as it is ("quiet") and beside --spinners CPU-bound processes
this script starts ("busy"), alternating quiet and busy repetitions so that other load drifts
into both alike. Prints per setting the median times and busy/quiet, and the load average.

    python bench/bench_threads.py                      # 1, 2 (= cores), 2 passive, 2 and 1 pinned, auto
    python bench/bench_threads.py --settings 1,auto --reps 5
    python bench/bench_threads.py --models builtin-tiny --spinners 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable

MODELS = ("builtin-tiny", "smollm2-135m")
SPIN = "import sys; print('spinning', flush=True)\nwhile True: pass"
# Spellings of "how many threads" to leave to the setting under test, not to this shell.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TORCH_THREADS",
                    "OMP_PROC_BIND", "OMP_PLACES")


class Spinners:
    """``count`` CPU-bound processes, running from ``__enter__`` (each has said so) to ``__exit__``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Spinners:
        for _ in range(self.count):
            proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()  # it runs its loop from here on
            self.procs.append(proc)
        return self

    def __exit__(self, *_exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()


def child(args) -> None:
    """One setting, every model: prints one JSON line of median seconds per (model, work, load)."""
    results: dict[str, object] = {}
    for model in args.models.split(","):
        results.update(measure_model(model, args))
    print("RESULT " + json.dumps(results), flush=True)


def measure_model(model: str, args) -> dict[str, object]:
    import torch

    from backend import AdamParams, FwdBwdRequest, SamplingParams
    from bench.bench import load
    from bench.bench import random_example as make_example

    backend = load(model, args.cache_dir, "cpu", torch_threads=os.environ.get("TORCH_THREADS", "auto"))
    rng = random.Random(0)
    vocab = backend.model.get_input_embeddings().weight.shape[0]
    ids = [backend.add_lora(8, 16.0, None, seed)["model_id"] for seed in range(args.adapters)]
    requests = [FwdBwdRequest(a, [make_example(rng, args.seq_len, vocab)]) for a in ids]
    adam = AdamParams(learning_rate=1e-4)
    prompts = [[rng.randrange(3, 259) for _ in range(16)] for _ in ids]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, stop_at_eos=False)

    def train() -> None:  # one fused pass of every adapter's sequence, then every Adam step
        for out in backend.forward_backward(requests):
            if isinstance(out, BaseException):
                raise out
        backend.optim_steps([(a, adam) for a in ids])

    def sample() -> None:  # --samples rows per adapter, decoding together in the shared loop
        futures = [backend.sample_async(a, [p] * args.samples, params) for a, p in zip(ids, prompts, strict=True)]
        assert sum(sum(f.result()["num_tokens"]) for f in futures) == len(ids) * args.samples * args.new_tokens

    results: dict[str, object] = {
        f"{model}/threads": backend.compute.run(torch.get_num_threads),  # as the compute thread sees it
        # (TORCH_THREADS=auto: the range, and after the runs how often the team was resized)
        "why": backend.compute.plan.describe(),
    }
    for name, work in (("train", train), ("sample", sample)):
        quiet, busy = measure(work, args.reps, args.spinners, args.give_up_s)
        print(f"  {model} {name}: quiet {quiet:.3f} s, busy {busy:.3f} s", flush=True)
        results[f"{model}/{name}/quiet"] = quiet
        results[f"{model}/{name}/busy"] = busy
    if backend.compute.tuner is not None:
        results[f"{model}/threads"] = f"1-{backend.compute.plan.intra_op} ({backend.compute.tuner.changes} changes)"
    backend.close()
    return results


def measure(work: Callable[[], None], reps: int, spinners: int, give_up_s: float) -> tuple[float, float]:
    """Median seconds of ``work`` quiet and busy, after a warm-up of each; NaN for both when a
    warm-up took over ``give_up_s`` (a setting that collapses would hold the run for many minutes)."""
    if timed(work) > give_up_s:
        return math.nan, math.nan
    with Spinners(spinners):
        if timed(work) > give_up_s:
            return math.nan, math.nan
    quiet, busy = [], []
    for _ in range(reps):
        quiet.append(timed(work))
        with Spinners(spinners):
            busy.append(timed(work))
    return statistics.median(quiet), statistics.median(busy)


def timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def run_setting(setting: str, args) -> dict:
    """``setting``: "THREADS", "THREADS:WAIT_POLICY", either with "@close" (each OpenMP thread
    pinned to a core: OMP_PROC_BIND=close, OMP_PLACES=cores); run in a child process of its own."""
    threads_and_wait, _, bind = setting.partition("@")
    threads, _, wait = threads_and_wait.partition(":")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["TORCH_THREADS"] = threads
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    if bind:
        env["OMP_PROC_BIND"], env["OMP_PLACES"] = bind, "cores"
    command = [sys.executable, __file__, "--child", "--models", args.models, "--reps", str(args.reps),
               "--spinners", str(args.spinners), "--adapters", str(args.adapters), "--seq-len", str(args.seq_len),
               "--new-tokens", str(args.new_tokens), "--samples", str(args.samples), "--give-up-s", str(args.give_up_s),
               "--cache-dir", args.cache_dir]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:  # progress as it comes: a slow setting shows itself early
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
        else:
            print(f"[{setting}] {line}", end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"setting {setting} failed with exit status {proc.returncode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--settings", default=f"1,{cores},{cores}:PASSIVE,{cores}@close,1@close,auto",
                        help="comma-separated TORCH_THREADS values, each optionally :OMP_WAIT_POLICY and/or "
                             "@close (threads pinned to cores)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--spinners", type=int, default=1, help="CPU-bound processes beside the busy runs")
    parser.add_argument("--adapters", type=int, default=8, help="adapters in the training step, rows in the decode")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens of each adapter's training sequence")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="samples of one prompt per adapter in the decode")
    parser.add_argument("--give-up-s", type=float, default=30.0,
                        help="skip a work whose warm-up takes longer (shown as 'gave up')")
    parser.add_argument("--cache-dir", default="bench_results/models")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f"load average before: {os.getloadavg()}  CPUs: {len(os.sched_getaffinity(0))}", flush=True)
    started = time.perf_counter()
    rows = []
    for setting in args.settings.split(","):
        results = run_setting(setting, args)
        rows.append((setting, results))
        print(f"  {setting}: {results['why']}  ({time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f})",
              flush=True)
    print(f"load average after: {os.getloadavg()}  busy = beside {args.spinners} spinning process(es)\n")
    print(f"{args.adapters} adapters: training step = {args.adapters} x {args.seq_len} tokens fwd+bwd+Adam; "
          f"decode = {args.adapters * args.samples} rows x {args.new_tokens} tokens. Median of {args.reps}, seconds.\n")
    print("| model | setting | threads | train quiet | train busy | busy/quiet "
          "| sample quiet | sample busy | busy/quiet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for setting, r in rows:
            cells = [model, setting, str(r[f"{model}/threads"])]
            for work in ("train", "sample"):
                quiet, busy = r[f"{model}/{work}/quiet"], r[f"{model}/{work}/busy"]
                if math.isnan(quiet):
                    cells += [f"> {args.give_up_s:g} (gave up)", "-", "-"]
                else:
                    cells += [f"{quiet:.3f}", f"{busy:.3f}", f"{busy / quiet:.1f}x"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
