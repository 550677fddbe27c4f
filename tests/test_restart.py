"""kill -9, then restart on the same data folder: checkpoints, finished results and
idempotency keys survive; requests that were queued or running say the server restarted."""

from __future__ import annotations

import signal

import requests

CHAT = [[{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]]


def post(server, path: str, body: dict, **headers) -> dict:
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=60).json()


def wait(server, request_id: str) -> dict:
    return post(server, "/retrieve_future", {"request_id": request_id, "timeout": 30})


def run(server, path: str, body: dict) -> dict:
    """Submit and wait: the job's result."""
    return wait(server, post(server, path, body)["request_id"])["result"]


def test_kill_9_and_restart(start_server, tmp_path):
    data = str(tmp_path / "data")
    server = start_server(THINKER_DATA_DIR=data)
    model_id = run(server, "/add_lora", {"rank": 4, "alpha": 8.0, "seed": 1})["model_id"]
    trained = post(server, "/fwdbwd", {"model_id": model_id, "data": CHAT}, **{"Idempotency-Key": "step-1"})
    finished = wait(server, trained["request_id"])
    run(server, "/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})
    path = run(server, "/save_state", {"model_id": model_id, "name": "before-crash"})["path"]
    params = {"max_tokens": 8, "temperature": 0}
    greedy = {"model_id": model_id, "prompts": ["Name a fruit."], "sampling_params": params}
    before = post(server, "/api/v1/sample", greedy)["outputs"]
    # A long request in flight and one queued behind it when the process dies.
    long = {
        "base_model": model_id,
        "num_samples": 4,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    in_flight = [post(server, "/api/v1/asample", long)["request_id"] for _ in range(2)]

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    server = start_server(THINKER_DATA_DIR=data)

    for request_id in in_flight:
        answer = post(server, "/api/v1/retrieve_future", {"request_id": request_id})
        assert answer["category"] == "server" and "restarted before this request finished" in answer["error"]
    assert wait(server, trained["request_id"]) == finished  # a finished result outlives the crash
    replay = post(server, "/fwdbwd", {"model_id": model_id, "data": CHAT}, **{"Idempotency-Key": "step-1"})
    assert replay == trained  # the same answer, and nothing ran (the adapter is gone anyway)

    listed = requests.get(f"{server.url}/checkpoints", timeout=30).json()["checkpoints"]
    assert path in [c["tinker_path"] for c in listed]
    restored = run(server, "/load_state", {"path": path})["model_id"]
    after = post(server, "/api/v1/sample", {**greedy, "model_id": restored})["outputs"]
    assert after == before
    assert "were queued or running when the server last stopped" in server.log()


def test_autosave_every_steps(start_server, tmp_path):
    server = start_server(THINKER_DATA_DIR=str(tmp_path / "auto"), AUTOSAVE_EVERY_STEPS="2")
    model_id = run(server, "/add_lora", {"rank": 4, "alpha": 8.0})["model_id"]
    for _ in range(9):
        run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})
        run(server, "/optim_step", {"model_id": model_id})
    names = [c["checkpoint_id"] for c in requests.get(f"{server.url}/checkpoints", timeout=30).json()["checkpoints"]]
    assert names == ["weights/autosave-000004", "weights/autosave-000006", "weights/autosave-000008"]
