"""Training throughput of EXECUTOR=ray with 1, 2 and 4 model workers, for 16 users, beside the
local executor doing the same work in the same run.

Each user has one adapter (placed by the cluster's rules: 16 users spread over the workers);
a step is one fused forward_backward over all 16 users' requests (split by worker, the parts
run at once) and one optimizer step of all 16. All executors are up at once and take turns,
one step each, after a warm-up; reported: the median step time and trained tokens per second.
(So a GPU box needs 1 + 2 + 4 = 7 GPUs for the default --workers 1 2 4.)

On a machine with one GPU per worker this shows the scaling. On a CPU-only box every worker
shares the same cores (each worker's torch uses WORKER_CPUS threads), so more workers cannot
be faster there: the figure then measures the cost of the hop, not the gain.

    python bench/bench_ray.py                      # builtin-tiny, 16 users, workers 1 2 4
    python bench/bench_ray.py --model HuggingFaceTB/SmolLM2-135M-Instruct --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import AdamParams, FwdBwdRequest, load_backend  # noqa: E402
from bench.workload import example  # noqa: E402
from thinker.core.config import Config  # noqa: E402

ADAM = AdamParams(learning_rate=1e-4)


class Workload:
    """16 users' adapters on one backend, and one step of all of them."""

    def __init__(self, backend, users: int, length: int) -> None:
        rng = random.Random(0)
        self.backend = backend
        self.ids = [backend.add_lora(8, 16.0, None, i, owner=f"user{i}")["model_id"] for i in range(users)]
        self.requests = [FwdBwdRequest(a, [example(rng, length, backend.vocab_size)]) for a in self.ids]
        self.tokens = sum(ex.length for r in self.requests for ex in r.examples)

    def step(self) -> float:
        """Seconds for one fused forward_backward of every user's request + their optimizer steps."""
        started = time.perf_counter()
        for outcome in self.backend.forward_backward(self.requests):
            if isinstance(outcome, BaseException):
                raise outcome
        self.backend.optim_steps([(a, ADAM) for a in self.ids])
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin-tiny")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--length", type=int, default=128, help="tokens per user's sequence")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker-cpus", type=float, default=1.0)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="bench-ray-")
    config = Config(base_model=args.model, thinker_data_dir=data_dir, worker_cpus=args.worker_cpus,
                    torch_threads=str(max(1, int(args.worker_cpus))))
    print(f"{args.users} users, one {args.length}-token sequence each per step; {os.cpu_count()} CPUs on this machine")

    import ray

    from backend.cluster import ClusterBackend
    from backend.cluster.workers import RayWorkers, start_local_ray

    # Every executor is up at once and the reps take turns (local, 1, 2, 4, local, ...), so
    # a neighbour's load on a shared machine falls on all of them alike.
    start_local_ray(sum(args.workers) * args.worker_cpus + 1)
    local = load_backend(config)
    runs = [("local", Workload(local, args.users, args.length))]
    clusters = []
    try:
        for count in args.workers:
            cluster_config = Config(**{**config.__dict__, "executor": "ray", "workers": count})
            clusters.append(ClusterBackend(cluster_config, RayWorkers(cluster_config)))
            label = f"ray, {count} worker{'s' if count > 1 else ''}"
            runs.append((label, Workload(clusters[-1], args.users, args.length)))
        times: dict[str, list[float]] = {label: [] for label, _ in runs}
        for rep in range(args.warmup + args.reps):
            for label, workload in runs:
                seconds = workload.step()
                if rep >= args.warmup:
                    times[label].append(seconds)
    finally:
        local.close()
        for cluster in clusters:
            cluster.recovery.stop()
            for name in cluster.worker_names():
                cluster.workers.kill(cluster.handle(name))
        ray.shutdown()
    rows = [(label, times[label], workload.tokens) for label, workload in runs]

    base = statistics.median(rows[0][1])
    print(f"{'executor':<18} {'step s (median)':>16} {'tokens/s':>10} {'vs local':>9}")
    for label, times, tokens in rows:
        median = statistics.median(times)
        print(f"{label:<18} {median:>16.3f} {tokens / median:>10.0f} {base / median:>8.2f}x")


if __name__ == "__main__":
    main()
