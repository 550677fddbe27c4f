"""kill -9, then restart on the same data folder: checkpoints, finished results and
idempotency keys survive; requests that were queued or running say the server restarted."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest
import requests
import tinker
from tinker import types

from thinker.http.tinker.sessions import GAP_TIMEOUT_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

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
    # The futures table keeps what asked for each future, its status and its error.
    with sqlite3.connect(f"{data}/thinker.db") as db:
        status, error, asked = db.execute(
            "SELECT status, error, request FROM futures WHERE id = ?", (in_flight[0],)
        ).fetchone()
    assert status == "failed" and "restarted" in error and json.loads(asked)["endpoint"] == "POST /api/v1/asample"
    assert wait(server, trained["request_id"]) == finished  # a finished result outlives the crash
    replay = post(server, "/fwdbwd", {"model_id": model_id, "data": CHAT}, **{"Idempotency-Key": "step-1"})
    assert replay == trained  # the same answer, and nothing ran (the adapter is gone anyway)
    # Without autosave the adapter itself is lost; asking for it says so and where to go on from.
    lost = requests.post(f"{server.url}/fwdbwd", json={"model_id": model_id, "data": CHAT}, timeout=30)
    assert lost.status_code == 404
    assert "lost when the server restarted" in lost.json()["error"] and path in lost.json()["error"]

    listed = requests.get(f"{server.url}/checkpoints", timeout=30).json()["checkpoints"]
    assert path in [c["tinker_path"] for c in listed]
    restored = run(server, "/load_state", {"path": path})["model_id"]
    after = post(server, "/api/v1/sample", {**greedy, "model_id": restored})["outputs"]
    assert after == before
    assert "were queued or running when the server last stopped" in server.log()


def kill_and_restart(server, start_server):
    """kill -9, then start again on the same data folder and port."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    return start_server(**{**server.env, "PORT": str(server.port)})


def test_autosaved_adapters_come_back_under_their_own_ids(start_server, tmp_path):
    server = start_server(THINKER_DATA_DIR=str(tmp_path / "data"), AUTOSAVE_EVERY_STEPS="2")
    model_id = run(server, "/add_lora", {"rank": 4, "alpha": 8.0, "seed": 3})["model_id"]
    for _ in range(4):
        run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})
        run(server, "/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})
    probe = {"model_id": model_id, "data": CHAT}
    before = run(server, "/fwdbwd", probe)  # (its gradients die with the process: never stepped)

    server = kill_and_restart(server, start_server)
    assert "1 adapters restored from their newest checkpoint, 0 lost" in server.log()
    adapters = requests.get(f"{server.url}/adapters", timeout=30).json()["adapters"]
    assert [(a["model_id"], a["step"]) for a in adapters] == [(model_id, 4)]
    assert abs(run(server, "/fwdbwd", probe)["loss"] - before["loss"]) < 1e-6  # the same weights
    assert run(server, "/optim_step", {"model_id": model_id})["step"] == 5  # training goes on


def test_sigterm_autosaves_what_stepped_since_its_autosave(start_server, tmp_path):
    """A planned restart (SIGTERM) with autosave on loses nothing, even between autosaves."""
    server = start_server(THINKER_DATA_DIR=str(tmp_path / "data"), AUTOSAVE_EVERY_STEPS="5")
    model_id = run(server, "/add_lora", {"rank": 4, "alpha": 8.0, "seed": 4})["model_id"]
    for _ in range(3):  # no autosave yet (every 5)
        run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})
        run(server, "/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})
    before = run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})["loss"]
    server.proc.terminate()
    assert server.proc.wait(timeout=60) == 0 and "autosaved 1 adapters before exiting" in server.log()

    server = start_server(**{**server.env, "PORT": str(server.port)})
    adapters = requests.get(f"{server.url}/adapters", timeout=30).json()["adapters"]
    assert [(a["model_id"], a["step"]) for a in adapters] == [(model_id, 3)]
    assert abs(run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})["loss"] - before) < 1e-6
    server.proc.terminate()  # nothing stepped since the restore: nothing to save again
    assert server.proc.wait(timeout=60) == 0 and "autosaved 0 adapters before exiting" in server.log()


def test_autosave_every_steps(start_server, tmp_path):
    server = start_server(THINKER_DATA_DIR=str(tmp_path / "auto"), AUTOSAVE_EVERY_STEPS="2")
    model_id = run(server, "/add_lora", {"rank": 4, "alpha": 8.0})["model_id"]
    for _ in range(9):
        run(server, "/fwdbwd", {"model_id": model_id, "data": CHAT})
        run(server, "/optim_step", {"model_id": model_id})
    names = [c["checkpoint_id"] for c in requests.get(f"{server.url}/checkpoints", timeout=30).json()["checkpoints"]]
    assert names == ["weights/autosave-000004", "weights/autosave-000006", "weights/autosave-000008"]


def test_the_tinker_sdk_goes_on_after_a_restart(start_server, tmp_path, monkeypatch):
    """The same SDK objects keep working across kill -9: the session and the checkpoint's
    sampler are still known, and the model's seq_id numbering goes on where it stopped
    (a server that forgot it would hold the next request GAP_TIMEOUT_S for a missing seq_id)."""
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    server = start_server(THINKER_DATA_DIR=str(tmp_path / "data"), AUTOSAVE_EVERY_STEPS="1")
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-test-key")
    training = service.create_lora_training_client(base_model="builtin-tiny", rank=8, seed=1).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([72, 105, 33, 10]),
        loss_fn_inputs={"target_tokens": [105, 33, 10, 72], "weights": [1.0, 1.0, 1.0, 1.0]},
    )
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = training.save_weights_for_sampler("before").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    prompt = types.ModelInput.from_ints([72, 105])
    before = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    loss_before = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]

    server = kill_and_restart(server, start_server)
    started = time.monotonic()
    assert training.forward([datum], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss_before)
    assert time.monotonic() - started < GAP_TIMEOUT_S / 2  # no wait for seq_ids from before the restart
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == before
    service.close("success").result()
