"""The training work the fused-pass benchmarks share: N requests on N adapters of mixed
ranks with lengths spread over a range, the three ways to run one step of them, and a
side-by-side timer. Everything goes through HFBackend's public jobs (add_lora,
forward_backward, optim_steps), so it measures whatever LoRA layer and optimizer the tree has.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from backend import AdamParams, FwdBwdRequest, HFBackend
from backend.train.examples import Example
from bench.flops import sync

ADAM = AdamParams(learning_rate=1e-4)


def spread(n: int, low: int, high: int) -> list[int]:
    """``n`` integers evenly spread from ``low`` to ``high`` (both included)."""
    if n == 1:
        return [high]
    return [round(low + (high - low) * i / (n - 1)) for i in range(n)]


def example(rng: random.Random, length: int, vocab: int) -> Example:
    """``length`` input tokens; the loss is on the second half, like a prompt and its completion."""
    tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
    prompt = (length + 1) // 2
    return Example.from_sequence(tokens, [0.0] * prompt + [1.0] * (length + 1 - prompt))


def make_requests(backend: HFBackend, ranks: Sequence[int], lengths: Sequence[int], seed: int = 0):
    """One adapter per rank and one single-sequence request per adapter: (ids, requests)."""
    rng = random.Random(seed)
    ids = [backend.add_lora(r, 2.0 * r, None, seed + i)["model_id"] for i, r in enumerate(ranks)]
    requests = [FwdBwdRequest(a, [example(rng, n, backend.vocab_size)]) for a, n in zip(ids, lengths, strict=True)]
    return ids, requests


def one_adapter_request(requests: Sequence[FwdBwdRequest]) -> FwdBwdRequest:
    """Every request's sequences as one request on the first request's adapter."""
    return FwdBwdRequest(requests[0].adapter_id, [ex for r in requests for ex in r.examples])


def padded_tokens(requests: Sequence[FwdBwdRequest]) -> int:
    """Rows x longest row: the tokens a padded pass over these requests computes."""
    lengths = [ex.length for r in requests for ex in r.examples]
    return len(lengths) * max(lengths)


def real_tokens(requests: Sequence[FwdBwdRequest]) -> int:
    return sum(ex.length for r in requests for ex in r.examples)


def check(outcomes: list) -> list[dict]:
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def fused_step(backend: HFBackend, requests: Sequence[FwdBwdRequest]) -> None:
    """One pass over every request, then every adapter's optimizer step in one job."""
    results = check(backend.forward_backward(list(requests)))
    if results[0]["batch_requests"] != len(requests):  # fell back to one pass per request
        raise RuntimeError(f"the pass was not fused: {results[0]['batch_requests']} of {len(requests)} requests")
    check(backend.optim_steps([(r.adapter_id, ADAM) for r in requests]))


def sequential_steps(backend: HFBackend, requests: Sequence[FwdBwdRequest]) -> None:
    """Each request alone: its pass, then its adapter's step."""
    for request in requests:
        check(backend.forward_backward([request]))
        check(backend.optim_steps([(request.adapter_id, ADAM)]))


def one_adapter_step(backend: HFBackend, request: FwdBwdRequest) -> None:
    check(backend.forward_backward([request]))
    check(backend.optim_steps([(request.adapter_id, ADAM)]))


def side_by_side(
    modes: dict[str, Callable[[], object]], reps: int, device: torch.device, cpu: dict[str, float] | None = None
) -> dict[str, float]:
    """Median seconds per mode. The caller warms up; the modes take turns in every repetition
    so that a change in the machine's load hits each of them alike. ``cpu``: filled with the
    median CPU seconds of the process per mode (on a shared machine, what the work cost
    whatever the other processes took of the wall time)."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    cpu_times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(reps):
        for name, fn in modes.items():
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    if cpu is not None:
        cpu.update({name: statistics.median(t) for name, t in cpu_times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def machine_line() -> str:
    """What else ran and how torch was told to thread: needed to read any CPU figure."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={omp}, "
        f"{os.cpu_count()} CPUs, load average {load}"
    )
