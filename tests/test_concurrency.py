"""Concurrent users over real HTTP: isolation between adapters and per-adapter order."""

from __future__ import annotations

import random
import threading

import pytest

from client_example import TinkerClient

pytestmark = pytest.mark.e2e

PROMPT = "Hello!"
ANSWERS = {"Alice": "Hi Alice!", "Bob": "Hi Bob!", "Carol": "Hi Carol!"}


def _conversation(answer: str, prompt: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_three_users_train_the_same_prompt_to_different_answers(server):
    adapters: dict[str, str] = {}
    errors: list[BaseException] = []

    def user(name: str, seed: int) -> None:
        try:
            with TinkerClient(server.url) as client:
                model_id = client.create_lora(rank=8, alpha=16, seed=seed)
                adapters[name] = model_id
                data = [_conversation(ANSWERS[name])]
                for _ in range(60):
                    client.train_step(model_id, data, learning_rate=5e-3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(name, i)) for i, name in enumerate(ANSWERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    with TinkerClient(server.url) as client:
        for name, model_id in adapters.items():
            out = client.sample(model_id, [PROMPT], max_tokens=20, temperature=0)
            assert out["generated_text"] == ANSWERS[name], (name, out)
        base = client.sample("base", [PROMPT], max_tokens=20, temperature=0)["generated_text"]
        assert not any(answer in base for answer in ANSWERS.values())


def _script(seed: int) -> list[tuple[str, object]]:
    """A training script for one adapter: fwdbwd (sometimes two, accumulating) then a step."""
    rng = random.Random(seed)
    ops: list[tuple[str, object]] = []
    for step in range(6):
        for k in range(rng.choice([1, 2])):
            answer = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 12)))
            ops.append(("fwdbwd", [_conversation(answer, f"q{step}{k}")]))
        ops.append(("optim_step", rng.choice([1e-2, 5e-3, 2e-2])))
    return ops


def _submit(client: TinkerClient, model_id: str, op: tuple[str, object]) -> str:
    kind, arg = op
    if kind == "fwdbwd":
        return client.fwdbwd(model_id, arg)
    return client.optim_step(model_id, learning_rate=arg)


def _losses(client: TinkerClient, request_ids: list[str], script) -> list[float]:
    results = [client.wait_for_result(rid, timeout=120) for rid in request_ids]
    return [r["loss"] for r, (kind, _) in zip(results, script, strict=True) if kind == "fwdbwd"]


def test_interleaved_submissions_keep_each_adapters_order(server):
    seeds = [101, 102, 103, 104]
    scripts = {seed: _script(seed) for seed in seeds}
    with TinkerClient(server.url) as client:
        concurrent_ids = {seed: client.create_lora(seed=seed) for seed in seeds}

    # Many threads submit without waiting; each takes the next op of a random adapter
    # (under that adapter's lock, so the submission order is known).
    next_op = dict.fromkeys(seeds, 0)
    submitted: dict[int, list[str]] = {seed: [] for seed in seeds}
    locks = {seed: threading.Lock() for seed in seeds}

    def submitter(worker: int) -> None:
        rng = random.Random(worker)
        with TinkerClient(server.url) as client:
            while True:
                open_seeds = [s for s in seeds if next_op[s] < len(scripts[s])]
                if not open_seeds:
                    return
                seed = rng.choice(open_seeds)
                with locks[seed]:
                    i = next_op[seed]
                    if i >= len(scripts[seed]):
                        continue
                    submitted[seed].append(_submit(client, concurrent_ids[seed], scripts[seed][i]))
                    next_op[seed] = i + 1

    threads = [threading.Thread(target=submitter, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    with TinkerClient(server.url) as client:
        concurrent = {seed: _losses(client, submitted[seed], scripts[seed]) for seed in seeds}
        # The reference: the same scripts, one request at a time, on fresh adapters.
        for seed in seeds:
            model_id = client.create_lora(seed=seed)
            reference = []
            for op in scripts[seed]:
                result = client.wait_for_result(_submit(client, model_id, op))
                if op[0] == "fwdbwd":
                    reference.append(result["loss"])
            assert concurrent[seed] == pytest.approx(reference, abs=1e-5), seed
            assert len(set(reference)) > 1


@pytest.fixture(scope="module")
def patient_server(start_server):
    """A server whose fused pass waits for the requests of recently active users (up to 5 s
    after the latest joined), or until it holds 4 rows: users in step fuse without racing."""
    return start_server(BATCH_WINDOW_MS="5000", MAX_BATCH_SEQUENCES="4")


@pytest.mark.slow
def test_concurrent_users_share_fused_passes(patient_server):
    """Four users training at once over HTTP end up in the same forward/backward pass. After a
    first step each (which makes every user a recently active one) and a barrier, every pass
    holds all four: the pass waits for them rather than hoping they arrive together."""
    users = 4
    in_step = threading.Barrier(users)
    batch_sizes: dict[int, list[int]] = {}

    def user(seed: int) -> None:
        sizes = batch_sizes.setdefault(seed, [])
        with TinkerClient(patient_server.url) as client:
            model_id = client.create_lora(seed=seed)
            for step in range(4):
                result = client.wait_for_result(client.fwdbwd(model_id, [_conversation(f"answer {seed} {step}")]))
                client.wait_for_result(client.optim_step(model_id, learning_rate=1e-3))
                sizes.append(result["batch_requests"])
                if step == 0:
                    in_step.wait(timeout=120)

    threads = [threading.Thread(target=user, args=(300 + i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(batch_sizes) == [300, 301, 302, 303] and all(len(s) == 4 for s in batch_sizes.values())
    assert all(sizes[1:] == [4, 4, 4] for sizes in batch_sizes.values()), batch_sizes
