"""The HTTP half of bench.py: a real server (create_app + waitress) in this process.

Measures the round trip of a trivial op over loopback, and N concurrent clients (each:
fwdbwd + optim_step, then sampling) against the same work sent one client after another.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root

import random
import socket
import statistics
import string
import threading
import time

from rich.table import Table

from app import create_app
from client_example import TinkerClient
from thinker.core.config import Config
from thinker.obs.progress import make_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def http_benchmarks(backend, model: str, args, log) -> dict:
    """Serve the already loaded (and warmed up) ``backend`` over HTTP and measure."""
    from waitress import create_server

    port = _free_port()
    config = Config(
        host="127.0.0.1",
        port=port,
        base_model=backend.loaded.path,
        device=args.device,
        thinker_cache_dir=args.cache_dir,
        thinker_data_dir=str(Path(args.cache_dir) / "bench-data"),
    )
    app = create_app(config, backend=backend)
    server = create_server(app, host="127.0.0.1", port=port, threads=config.http_threads)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        return {"model": model, "clients": args.http_clients, **_round_trips(url), **_clients(url, args, log)}
    finally:
        server.close()
        app.extensions["thinker"].pool.shutdown(wait=False)


def http_table(http: dict) -> Table:
    """The HTTP results (see ``http_benchmarks``) for the terminal."""
    rows = [
        [
            "POST /retrieve_future round trip",
            "",
            "",
            f"{http['rtt_p50_ms']:.2f} ms, {http['rtt_p95_ms']:.2f} ms",
        ],
        ["GET /healthz round trip", "", "", f"{http['healthz_p50_ms']:.2f} ms"],
    ]
    for phase, name in (("train", "training"), ("sample", "sampling")):
        rows.append(
            [
                f"{name}, {http['clients']} clients ({http['model']})",
                f"{http[f'{phase}_sequential_s']:.1f}s",
                f"{http[f'{phase}_concurrent_s']:.1f}s",
                f"{http[f'{phase}_speedup']:.2f}x",
            ]
        )
    headers = ["Measure", "One after another", "Concurrent", "Speedup / p50, p95"]
    return make_table("Over loopback HTTP", headers, rows, justify="lrrr", compact=True)


def _round_trips(url: str, calls: int = 300) -> dict:
    with TinkerClient(url) as client:
        done = client.add_lora()
        client.wait_for_result(done)
        rtt, health = [], []
        for _ in range(calls):
            start = time.perf_counter()
            client.retrieve_future(done)
            rtt.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            client.healthz()
            health.append((time.perf_counter() - start) * 1000)
    return {
        "rtt_p50_ms": statistics.median(rtt),
        "rtt_p95_ms": _percentile(rtt, 95),
        "healthz_p50_ms": statistics.median(health),
    }


def _conversation(rng: random.Random, chars: int) -> list[dict]:
    """About ``chars`` tokens with the byte-level tokenizer of the benchmark models."""
    text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars))
    half = len(text) // 2
    return [{"role": "user", "content": text[:half]}, {"role": "assistant", "content": text[half:]}]


def _clients(url: str, args, log) -> dict:
    n, rng = args.http_clients, random.Random(1)
    with TinkerClient(url) as client:
        ids = [client.create_lora(rank=args.rank, alpha=2.0 * args.rank, seed=i) for i in range(n)]
    # The chat template adds about 30 tokens around the two turns.
    data = [[_conversation(rng, args.seq_len - 30)] for _ in range(n)]

    def train(client: TinkerClient, i: int) -> None:
        client.wait_for_result(client.fwdbwd(ids[i], data[i]))
        client.wait_for_result(client.optim_step(ids[i], learning_rate=1e-4))

    def sample(client: TinkerClient, i: int, max_tokens: int = args.new_tokens) -> None:
        client.sample(ids[i], ["Tell me a story."], max_tokens=max_tokens, temperature=0)

    def concurrent(max_tokens: int = args.new_tokens) -> tuple[float, float]:
        phase_ends: list[list[float]] = [[], []]
        start_gate = threading.Barrier(n)
        middle_gate = threading.Barrier(n)
        clients = [TinkerClient(url, timeout=600) for _ in range(n)]

        def run(i: int) -> None:
            start_gate.wait()
            train(clients[i], i)
            phase_ends[0].append(time.perf_counter())
            middle_gate.wait()
            sample(clients[i], i, max_tokens)
            phase_ends[1].append(time.perf_counter())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clients:
            c.close()
        train_end = max(phase_ends[0])
        return train_end - t0, max(phase_ends[1]) - train_end

    def sequential() -> tuple[float, float]:
        train_s = sample_s = 0.0
        with TinkerClient(url, timeout=600) as client:
            for i in range(n):
                start = time.perf_counter()
                train(client, i)
                middle = time.perf_counter()
                sample(client, i)
                train_s, sample_s = train_s + middle - start, sample_s + time.perf_counter() - middle
        return train_s, sample_s

    log("  HTTP warm-up round...")
    concurrent(max_tokens=4)
    log("  HTTP: clients one after another...")
    seq_train, seq_sample = sequential()
    log(f"  sequential: training {seq_train:.1f}s, sampling {seq_sample:.1f}s; now concurrently...")
    con_train, con_sample = concurrent()
    log(f"  concurrent: training {con_train:.1f}s, sampling {con_sample:.1f}s")
    return {
        "train_sequential_s": seq_train,
        "train_concurrent_s": con_train,
        "sample_sequential_s": seq_sample,
        "sample_concurrent_s": con_sample,
        "train_speedup": seq_train / con_train,
        "sample_speedup": seq_sample / con_sample,
    }
