"""Fused scheduling: BATCHING on and off train identically; order and limits hold."""

from __future__ import annotations

import random
import threading

import pytest

from backend import AdamParams, FwdBwdRequest
from worker_pool import BatchLimits, WorkerPool

pytestmark = pytest.mark.unit


def _pool(
    backend, batching: bool, limits: BatchLimits | None = None, hold: threading.Event | None = None
) -> WorkerPool:
    """``hold``: forward-backward passes wait for it to be set before they run (jobs sent
    meanwhile queue behind the held pass, so the next pass surely fuses them)."""
    limits = limits or BatchLimits(max_tokens=8192, max_sequences=64, window_s=0.02)

    def forward_backward(payloads: list) -> list:
        assert hold is None or hold.wait(60), "the held pass was never released"
        return backend.forward_backward(payloads)

    runners = {"fwdbwd": forward_backward, "optim_step": backend.optim_steps}
    return WorkerPool(4, runners=runners, limits=limits if batching else None)


def _conversation(rng: random.Random) -> list[dict]:
    answer = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(2, 20)))
    return [{"role": "user", "content": f"q{rng.randint(0, 99)}"}, {"role": "assistant", "content": answer}]


def _train(
    backend, pool: WorkerPool, seeds: list[int], steps: int = 5, submitted: threading.Event | None = None
) -> tuple[dict[int, list[float]], list[dict]]:
    """Each adapter's thread submits its whole script without waiting, then collects.
    ``submitted`` is set once every script is queued."""
    ids = {seed: backend.add_lora(4 + seed % 3 * 4, 16.0, None, seed)["model_id"] for seed in seeds}
    futures: dict[int, list] = {}

    def user(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        for _ in range(steps):
            for _ in range(rng.choice([1, 2])):  # sometimes accumulate over two passes
                examples = backend.render_conversations([_conversation(rng) for _ in range(rng.randint(1, 3))])
                request = FwdBwdRequest(ids[seed], examples)
                longest = max(ex.length for ex in examples)
                mine.append(pool.submit_fusable(ids[seed], "fwdbwd", "fwdbwd", request, len(examples), longest))
            adam = AdamParams(learning_rate=rng.choice([1e-2, 2e-2]))
            pool.submit_fusable(ids[seed], "optim_step", "optim_step", (ids[seed], adam), 0, 0)
        futures[seed] = mine

    threads = [threading.Thread(target=user, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if submitted is not None:
        submitted.set()
    losses, results = {}, []
    for seed, mine in futures.items():
        for f in mine:
            assert f.wait(60) and f.status == "completed", f.error
        losses[seed] = [f.result["loss"] for f in mine]
        results += [f.result for f in mine]
    return losses, results


def test_batching_on_and_off_train_identically(backend):
    seeds = [201, 202, 203, 204, 205]
    # The first fused pass is held until every script is queued: the other adapters' first
    # requests then wait together, and the next pass fuses them whatever the timing.
    queued = threading.Event()
    fused_pool, plain_pool = _pool(backend, True, hold=queued), _pool(backend, False)
    try:
        fused, fused_results = _train(backend, fused_pool, seeds, submitted=queued)
        plain, plain_results = _train(backend, plain_pool, seeds)
    finally:
        fused_pool.shutdown()
        plain_pool.shutdown()
    for seed in seeds:
        assert fused[seed] == pytest.approx(plain[seed], abs=1e-4)
    assert max(r["batch_requests"] for r in fused_results) > 1, "nothing was fused"
    assert fused_pool.stats()["fused_passes"] < fused_pool.stats()["fused_jobs"]
    assert all(r["batch_requests"] == 1 for r in plain_results)


def test_fused_passes_respect_the_limits(backend):
    pool = _pool(backend, True, BatchLimits(max_tokens=10_000, max_sequences=3, window_s=0.02))
    try:
        _, results = _train(backend, pool, [301, 302, 303, 304], steps=3)
    finally:
        pool.shutdown()
    assert all(r["batch_sequences"] <= 3 or r["batch_requests"] == 1 for r in results)

    pool = _pool(backend, True, BatchLimits(max_tokens=60, max_sequences=64, window_s=0.02))
    try:
        _, results = _train(backend, pool, [305, 306, 307], steps=2)
    finally:
        pool.shutdown()
    # every sequence here is 20+ tokens long: at most two rows of them fit in 60 padded tokens
    assert all(r["batch_sequences"] <= 2 or r["batch_requests"] == 1 for r in results)


def test_a_bad_request_in_a_fused_pass_fails_alone(backend):
    good_id = backend.add_lora(8, 16.0, None, 1)["model_id"]
    other_id = backend.add_lora(8, 16.0, None, 2)["model_id"]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_conv = [{"role": "user", "content": "x" * 2000}, {"role": "assistant", "content": "yo"}]
    outcomes = backend.forward_backward(
        [
            FwdBwdRequest(good_id, backend.render_conversations([conv])),
            FwdBwdRequest(other_id, backend.render_conversations([long_conv])),
        ]
    )
    assert isinstance(outcomes[0], dict) and outcomes[0]["loss"] > 0
    assert isinstance(outcomes[1], Exception) and "context window" in str(outcomes[1])
    for adapter_id in (good_id, other_id):
        backend.adapters.get(adapter_id).optimizer.zero_grad(set_to_none=True)


def test_lone_user_does_not_wait_for_the_window(backend):
    # An hour's window: a pass that waited for company could not finish within the test's wait.
    pool = _pool(backend, True, BatchLimits(window_s=3600.0))
    future = None
    try:
        adapter_id = backend.add_lora(8, 16.0, None, 9)["model_id"]
        examples = backend.render_conversations(
            [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
        )
        future = pool.submit_fusable(adapter_id, "fwdbwd", "fwdbwd", FwdBwdRequest(adapter_id, examples), 1, 20)
        assert future.wait(120), "a lone user's pass waited for company"
    finally:
        pool.shutdown(wait=future is not None and future.done.is_set())  # a waiting pass would hold join()


def test_jobs_pending_together_run_in_one_pass(backend):
    """submit_many queues atomically, as when many users' requests wait behind a busy
    server: every adapter's request shares a single pass."""
    pool = _pool(backend, True)
    try:
        conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
        items = []
        for seed in range(6):
            adapter_id = backend.add_lora(8, 16.0, None, 400 + seed)["model_id"]
            examples = backend.render_conversations([conv])
            items.append((adapter_id, "fwdbwd", "fwdbwd", FwdBwdRequest(adapter_id, examples), 1, examples[0].length))
        futures = pool.submit_many(items)
        for future in futures:
            assert future.wait(30) and future.status == "completed"
        assert {f.result["batch_requests"] for f in futures} == {6}
        assert pool.stats()["fused_passes"] == 1
    finally:
        pool.shutdown()


def test_optimizer_steps_of_several_adapters_share_one_job(backend):
    pool = _pool(backend, True)
    try:
        conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
        ids = [backend.add_lora(8, 16.0, None, 500 + seed)["model_id"] for seed in range(4)]
        for adapter_id in ids:
            backend.forward_backward_one(FwdBwdRequest(adapter_id, backend.render_conversations([conv])))
        adam = AdamParams(learning_rate=1e-3)
        items = [(a, "optim_step", "optim_step", (a, adam), 0, 0) for a in ids]
        items.append(("base_lora_gone", "optim_step", "optim_step", ("base_lora_gone", adam), 0, 0))
        futures = pool.submit_many(items)
        for future in futures:
            assert future.wait(30)
        assert [f.result["step"] for f in futures[:4]] == [1, 1, 1, 1]
        assert all(f.result["grad_norm"] > 0 for f in futures[:4])
        assert futures[4].status == "failed" and "base_lora_gone" in futures[4].error  # fails alone
        assert pool.stats()["fused_passes"] == 1
    finally:
        pool.shutdown()
