"""Offloading idle adapters (backend/lora/residency.py): one server holds 1000 registered
adapters while at most MAX_RESIDENT_ADAPTERS sit on the accelerator, and an adapter that was
moved out and back trains and samples exactly as if it had never left."""

from __future__ import annotations

import pytest
import requests

from backend.lora.residency import Residency

CHAT = [[{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]]


@pytest.mark.unit
def test_in_use_adapters_stay_and_the_least_recently_used_go(backend):
    residency = Residency(backend.adapters, backend.device, max_resident=2)
    made = [backend.add_lora(4, 8.0, None, i)["model_id"] for i in range(3)]
    try:
        assert residency.resident == 2 and residency.offloads == 1  # the oldest went out
        with residency.using([made[0]]):  # back in; made[1] is now the least recently used
            assert residency.reloads == 1 and residency.offloads == 2
            with residency.using([made[1], made[2]]):  # three in use: over the limit, none may go
                assert residency.resident == 3
            assert residency.resident == 3  # leaves only at the next call that needs room
        with residency.using([made[2]]):
            assert residency.resident == 2
    finally:
        for adapter_id in made:
            backend.remove_adapter(adapter_id)
        backend.adapters.created_hooks.remove(residency._created)
        backend.adapters.removed_hooks.remove(residency._removed)
    assert residency.resident == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_a_thousand_adapters(start_server):
    server = start_server(MAX_RESIDENT_ADAPTERS="8", MAX_PENDING_PER_USER="2000", MAX_PENDING="2000")
    http = requests.Session()

    def post(path: str, body: dict) -> dict:
        return http.post(f"{server.url}{path}", json=body, timeout=60).json()

    def run(path: str, body: dict) -> dict:
        answer = post("/retrieve_future", {"request_id": post(path, body)["request_id"], "timeout": 60})
        assert answer["status"] == "completed", answer
        return answer["result"]

    pending = [post("/add_lora", {"rank": 4, "alpha": 8.0, "seed": i})["request_id"] for i in range(1000)]
    ids = [post("/retrieve_future", {"request_id": r, "timeout": 60})["result"]["model_id"] for r in pending]
    health = http.get(f"{server.url}/healthz", timeout=30).json()
    assert health["adapters"] == 1000 and health["adapters_resident"] <= 8

    first = ids[0]
    for _ in range(3):
        run("/fwdbwd", {"model_id": first, "data": CHAT})
        run("/optim_step", {"model_id": first, "adam_params": {"learning_rate": 1e-2}})
    greedy = {"model_id": first, "prompts": ["Name a fruit."], "sampling_params": {"max_tokens": 8, "temperature": 0}}
    sampled = post("/api/v1/sample", greedy)["outputs"]
    loss = run("/fwdbwd", {"model_id": first, "data": CHAT})["loss"]  # (gradients now wait on it)

    for other in ids[1:40]:  # 39 other adapters train: the first one is moved out
        run("/fwdbwd", {"model_id": other, "data": CHAT})
    moved = http.get(f"{server.url}/healthz", timeout=30).json()
    assert moved["adapters_resident"] <= 8 and moved["adapter_offloads"] >= 39

    assert post("/api/v1/sample", greedy)["outputs"] == sampled  # back in, the same weights
    assert run("/fwdbwd", {"model_id": first, "data": CHAT})["loss"] == loss
    assert run("/optim_step", {"model_id": first})["step"] == 4  # gradients and AdamW state came along
    back = http.get(f"{server.url}/healthz", timeout=30).json()
    assert back["adapter_reloads"] > moved["adapter_reloads"]
