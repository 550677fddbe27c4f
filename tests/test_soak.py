"""Soak: 32 users x 20 steps at once through one server. No result is lost or duplicated,
and each user's losses equal those of the same steps run one user at a time."""

from __future__ import annotations

import threading

import pytest

from client_example import TinkerClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS, STEPS = 32, 20


def conversation(user: int, step: int) -> list[list[dict]]:
    return [[
        {"role": "user", "content": f"user {user} asks question {step % 3}"},
        {"role": "assistant", "content": f"answer {user * 7 % 11} to {step % 3}"},
    ]]


def train(url: str, user: int, losses: dict, steps_seen: dict) -> None:
    with TinkerClient(url) as client:
        model_id = client.wait_for_result(client.add_lora(base_model="base", rank=4, alpha=8, seed=user))["model_id"]
        for step in range(STEPS):
            result = client.wait_for_result(client.fwdbwd(model_id=model_id, data=conversation(user, step)))
            losses.setdefault(user, []).append(result["loss"])
            optim = client.wait_for_result(client.optim_step(model_id, learning_rate=5e-3))
            steps_seen.setdefault(user, []).append(optim["step"])


def test_32_users_at_once_match_one_at_a_time(server):
    together, steps = {}, {}
    threads = [threading.Thread(target=train, args=(server.url, u, together, steps)) for u in range(USERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert sorted(together) == list(range(USERS))
    for user in range(USERS):  # every step answered once, in order
        assert steps[user] == list(range(1, STEPS + 1)), user
    alone, _ = {}, {}
    for user in range(USERS):
        train(server.url, user, alone, {})
    for user in range(USERS):
        assert together[user] == pytest.approx(alone[user], rel=1e-4, abs=1e-5), user
