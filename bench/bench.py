"""Benchmark: what fused multi-adapter batching buys, measured side by side in one process.

For N users on N distinct adapters it times, on each model:
- training (one fwdbwd of --batch sequences of --seq-len tokens + optim_step per user):
  sequential (one request at a time), a thread pool without fusion, fused passes, and the
  reference "one adapter with the same total batch";
- sampling (N prompts x --new-tokens): one request after another vs the shared decode loop;
and, over loopback HTTP against a real server in this process, the round trip of a trivial
op and 8 concurrent clients against the same work sent one client after another.

    python bench.py            # N in 1,2,4,8,16; builtin-tiny and the SmolLM2-135M architecture
    python bench.py --quick    # N in 1,8, one repetition: a few minutes on a 2-core CPU
    python bench.py --device cuda --peak-tflops 989   # on a GPU, with model FLOPs utilisation

In a terminal a live bar shows which model, N and phase is running. Prints the results as
markdown and as tables, and writes bench_results/bench.md (tables) and bench_results/bench.png
(plot).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import argparse
import random
import statistics
import threading
import time

import torch
from rich.table import Table

from backend import AdamParams, FwdBwdRequest, HFBackend, SamplingParams, load_backend
from backend.model.random_models import ensure_random_model
from backend.train.examples import Example
from bench.bench_http import http_benchmarks, http_table
from bench.flops import ModelShape, device_peak_tflops, rows_of, training_flops
from thinker.core.config import Config
from thinker.obs.progress import make_console, make_table, step_progress
from worker_pool import BatchLimits, WorkerPool

MODELS = ("builtin-tiny", "smollm2-135m")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load(
    model: str, cache_dir: str, device: str | None, layers: int | None = None, sampler: bool = True, **settings
) -> HFBackend:
    """``model`` (builtin-tiny, or a real architecture with random weights, cut to ``layers``
    decoder layers if given) with the sampler started; ``settings``: other Config fields."""
    if model == "builtin-tiny":
        path = model
    else:
        path = str(ensure_random_model(model, cache_dir, layers=layers))
    config = Config(base_model=path, thinker_cache_dir=cache_dir, device=device, **settings)
    backend = load_backend(config, Path(cache_dir) / "bench-data")
    if sampler:
        backend.start_sampler(max_rows=64, window_s=Config().batch_window_ms / 1000)
    return backend


def timed(fn, reps: int) -> float:
    """Median wall time of ``reps`` runs, in seconds (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_example(rng: random.Random, length: int, vocab: int) -> Example:
    tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
    return Example.from_sequence(tokens, [1.0] * (length + 1))


def train_modes(backend: HFBackend, n: int, args, rng: random.Random) -> tuple[dict[str, float], float]:
    """Trained tokens per second for each way of running N users' steps, and the useful
    FLOPs per trained token (bench/flops.py). Every mode goes through a worker pool, as the
    server does, and its model work through the backend."""
    vocab = backend.model.get_input_embeddings().weight.shape[0]
    ids = [backend.add_lora(args.rank, 2.0 * args.rank, None, seed)["model_id"] for seed in range(n)]
    requests = [FwdBwdRequest(a, [random_example(rng, args.seq_len, vocab) for _ in range(args.batch)]) for a in ids]
    adam = AdamParams(learning_rate=1e-4)
    runner = {"fwdbwd": backend.forward_backward, "optim_step": backend.optim_steps}
    one_at_a_time = WorkerPool(1, runners=runner, limits=None)
    plain_pool = WorkerPool(4, runners=runner, limits=None)
    fused_pool = WorkerPool(1, runners=runner, limits=BatchLimits(max_tokens=1 << 20, max_sequences=1024))

    def wait(futures) -> None:
        for future in futures:
            future.wait(None)
            if future.error:
                raise RuntimeError(future.error)

    def step(pool: WorkerPool, batch: list[FwdBwdRequest]) -> list:
        items = [(r.adapter_id, "fwdbwd", "fwdbwd", r, len(r.examples), args.seq_len) for r in batch]
        futures = pool.submit_many(items)
        adapters = dict.fromkeys(r.adapter_id for r in batch)
        return futures + pool.submit_many([(a, "optim_step", "optim_step", (a, adam), 0, 0) for a in adapters])

    def sequential():
        for request in requests:  # the next request is sent when the previous one is done
            wait(step(one_at_a_time, [request]))

    one = FwdBwdRequest(ids[0], [ex for r in requests for ex in r.examples])
    modes = {
        "sequential": sequential,
        "threads": lambda: wait(step(plain_pool, requests)),
        "fused": lambda: wait(step(fused_pool, requests)),
        "one_adapter": lambda: wait(step(one_at_a_time, [one])),
    }
    # Warm-up (first-touch allocations, lazy kernels): a small pass on each pool and one
    # pass of the fused size.
    for pool in (one_at_a_time, plain_pool, fused_pool):
        wait(step(pool, requests[:1]))
    if n > 1:
        modes["one_adapter"]()
    tokens = n * args.batch * args.seq_len
    result = {name: tokens / timed(fn, args.reps) for name, fn in modes.items()}
    flops_per_token = training_flops(ModelShape.of(backend.model), rows_of(backend, requests)) / tokens
    for pool in (one_at_a_time, plain_pool, fused_pool):
        pool.shutdown()
    for adapter_id in ids:
        backend.adapters.remove(adapter_id)
    return result, flops_per_token


def sample_modes(backend: HFBackend, n: int, args, rng: random.Random) -> dict[str, float]:
    """Sampled tokens per second: each request alone, one after another, vs the shared loop."""
    ids = [backend.add_lora(args.rank, 2.0 * args.rank, None, seed)["model_id"] for seed in range(n)]
    prompts = [[rng.randrange(3, 259) for _ in range(16)] for _ in range(n)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    pool = WorkerPool(1)
    counted: dict[str, int] = {}

    def one_by_one():
        outputs = []
        for a, p in zip(ids, prompts, strict=True):
            future = pool.submit(a, "sample", lambda a=a, p=p: backend.sample(a, [p], params))
            future.wait(None)
            outputs.append(future.result)
        counted["one_by_one"] = sum(sum(out["num_tokens"]) for out in outputs)

    def fused():
        futures = [backend.sample_async(a, [p], params) for a, p in zip(ids, prompts, strict=True)]
        counted["fused"] = sum(sum(f.result()["num_tokens"]) for f in futures)

    pool.submit(ids[0], "sample", lambda: backend.sample(ids[0], prompts[:1], params)).wait(None)  # warm-up
    fused()
    result = {"one_by_one": timed(one_by_one, args.reps), "fused": timed(fused, args.reps)}
    pool.shutdown()
    for adapter_id in ids:
        backend.adapters.remove(adapter_id)
    return {name: counted[name] / seconds for name, seconds in result.items()}


def peak_tflops(args, backend: HFBackend) -> float | None:
    """--peak-tflops, else a known GPU's datasheet peak; None on CPU (no MFU column)."""
    return args.peak_tflops or device_peak_tflops(backend.device)


TRAIN_SAMPLE_HEADERS = [
    "N",
    "sequential tok/s",
    "threads tok/s",
    "fused tok/s",
    "one adapter, same batch tok/s",
    "fused / sequential",
    "fused / one adapter",
    "sample one-by-one tok/s",
    "sample fused tok/s",
    "sample speedup",
]


def headers(rows: list[dict]) -> list[str]:
    return TRAIN_SAMPLE_HEADERS + (["MFU fused"] if rows[0].get("mfu") is not None else [])


def row_cells(r: dict) -> list[str]:
    """One N's figures, formatted as both the markdown and the rich table show them."""
    t, s = r["train"], r["sample"]
    cells = [
        str(r["n"]),
        f"{t['sequential']:.0f}",
        f"{t['threads']:.0f}",
        f"{t['fused']:.0f}",
        f"{t['one_adapter']:.0f}",
        f"{t['fused'] / t['sequential']:.2f}x",
        f"{t['fused'] / t['one_adapter']:.2f}",
        f"{s['one_by_one']:.1f}",
        f"{s['fused']:.1f}",
        f"{s['fused'] / s['one_by_one']:.2f}x",
    ]
    if r.get("mfu") is not None:
        cells.append(f"{r['mfu']:.1%}")
    return cells


def markdown(results: dict, http: dict, args) -> str:
    lines = [
        f"Training: {args.batch} x {args.seq_len} tokens per user, rank {args.rank}; "
        f"sampling: {args.new_tokens} new tokens per user (greedy). Median of {args.reps} run(s).",
        "",
    ]
    for model, rows in results.items():
        cols = headers(rows)
        lines += [f"### {model}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
        lines.append("")
    if http:
        lines += [
            "### Over loopback HTTP",
            "",
            f"- trivial op round trip (POST /retrieve_future of a finished future): "
            f"p50 {http['rtt_p50_ms']:.2f} ms, p95 {http['rtt_p95_ms']:.2f} ms",
            f"- GET /healthz round trip: p50 {http['healthz_p50_ms']:.2f} ms",
            f"- {http['clients']} concurrent clients vs one after another ({http['model']}): "
            f"training {http['train_speedup']:.2f}x ({http['train_sequential_s']:.1f}s -> "
            f"{http['train_concurrent_s']:.1f}s), sampling {http['sample_speedup']:.2f}x "
            f"({http['sample_sequential_s']:.1f}s -> {http['sample_concurrent_s']:.1f}s)",
            "",
        ]
    return "\n".join(lines)


# The markdown headers, shortened and broken onto two lines so the terminal table stays narrow.
RICH_HEADERS = [
    "N",
    "seq\ntok/s",
    "threads\ntok/s",
    "fused\ntok/s",
    "1 adapter\ntok/s",
    "fused/\nseq",
    "fused/\n1 adapter",
    "sample\n1-by-1",
    "sample\nfused",
    "sample\nspeedup",
    "MFU\nfused",
]


def rich_table(model: str, rows: list[dict]) -> Table:
    """The markdown table of one model, for the terminal."""
    cols = headers(rows)
    title = f"{model}: tokens/s, N users on distinct adapters"
    cells = [row_cells(r) for r in rows]
    return make_table(title, RICH_HEADERS[: len(cols)], cells, justify="r" * len(cols), compact=True)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (model, rows) in enumerate(results.items()):
        ns = [r["n"] for r in rows]
        for mode in ("sequential", "threads", "fused", "one_adapter"):
            axes[row][0].plot(ns, [r["train"][mode] for r in rows], marker="o", label=mode)
        for mode in ("one_by_one", "fused"):
            axes[row][1].plot(ns, [r["sample"][mode] for r in rows], marker="o", label=mode)
        for ax, title in zip(axes[row], ("training tokens/s", "sampled tokens/s"), strict=True):
            ax.set_title(f"{model}: {title}")
            ax.set_xlabel("users (distinct adapters)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in 1,8 and one repetition")
    parser.add_argument("--users", default="1,2,4,8,16", help="comma-separated N values")
    parser.add_argument("--models", default=",".join(MODELS), help=f"from {MODELS}")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="sequences per user per step")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--http-clients", type=int, default=8)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU")
    parser.add_argument("--cache-dir", default=Config().thinker_cache_dir)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    users = [1, 8] if args.quick else [int(n) for n in args.users.split(",")]
    if args.quick:
        args.reps = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    console = make_console()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device or 'auto'}")

    results: dict[str, list[dict]] = {}
    http: dict = {}
    models = args.models.split(",")
    http_model = "smollm2-135m" if "smollm2-135m" in models else models[-1]
    phases = 2 * len(models) * len(users) + (0 if args.no_http else 1)
    with step_progress(console, loss=False) as progress:
        task = progress.add_task("bench", total=phases)
        for model in models:
            log(f"loading {model}...")
            progress.update(task, description=f"{model}: loading")
            backend = load(model, args.cache_dir, args.device)
            peak = peak_tflops(args, backend)
            results[model] = []
            for n in users:
                log(f"{model} N={n}: training (sequential, threads, fused, one adapter)...")
                progress.update(task, description=f"{model} N={n}: training")
                train, flops_per_token = train_modes(backend, n, args, rng)
                progress.advance(task)
                log(f"{model} N={n}: sampling (one by one, fused)...")
                progress.update(task, description=f"{model} N={n}: sampling")
                sample = sample_modes(backend, n, args, rng)
                progress.advance(task)
                mfu = train["fused"] * flops_per_token / (peak * 1e12) if peak else None
                results[model].append({"n": n, "train": train, "sample": sample, "mfu": mfu})
                log(
                    "  train tok/s: "
                    + ", ".join(f"{k} {v:.0f}" for k, v in train.items())
                    + f" | fused/sequential {train['fused'] / train['sequential']:.2f}x"
                    + f", fused/one-adapter {train['fused'] / train['one_adapter']:.2f}"
                )
                log(
                    f"  sample tok/s: one-by-one {sample['one_by_one']:.1f}, fused {sample['fused']:.1f}"
                    + f" ({sample['fused'] / sample['one_by_one']:.2f}x)"
                )
            if model == http_model and not args.no_http:
                log(f"HTTP: round trips and {args.http_clients} concurrent clients on {model}...")
                progress.update(task, description=f"{model}: HTTP")
                http = http_benchmarks(backend, model, args, log)
                progress.advance(task)
            backend.close()
            del backend

    table = markdown(results, http, args)
    (out / "bench.md").write_text(table + "\n")
    plot(results, out / "bench.png")
    print("\n" + table)
    for model, rows in results.items():
        console.print()
        console.print(rich_table(model, rows))
    if http:
        console.print()
        console.print(http_table(http))
    log(f"wrote {out / 'bench.md'} and {out / 'bench.png'}")


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread error: {a.exc_value}", file=sys.stderr)
    main()
