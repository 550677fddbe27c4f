"""The REST API over real HTTP: shapes, futures, long-poll and every kind of bad input."""

from __future__ import annotations

import time

import pytest
import requests
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"}]


PROTOBUF = {"Content-Type": "application/x-protobuf"}


def post(server, path: str, json=None, data=None, headers=None) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=json, data=data, headers=headers, timeout=30)


def wait(server, request_id: str) -> requests.Response:
    return post(server, "/retrieve_future", {"request_id": request_id, "timeout": 30})


@pytest.fixture(scope="module")
def adapter(server) -> str:
    r = post(server, "/add_lora", {"base_model": "base", "rank": 8, "alpha": 16})
    return wait(server, r.json()["request_id"]).json()["result"]["model_id"]


def test_healthz(server):
    body = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert body["status"] == "ok"
    assert body["base_model"] == "builtin-tiny" and body["device"] == "cpu"
    assert body["workers"] == 4 and isinstance(body["adapters"], int)
    assert "fallback_reason" not in body  # BASE_MODEL was set explicitly


def test_add_lora_future_and_result(server):
    r = post(
        server, "/add_lora", {"base_model": "base", "rank": 4, "alpha": 8, "seed": 1, "target_modules": ["q_proj"]}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["model_id"] == "base" and body["request_id"].startswith("future_")
    done = wait(server, body["request_id"])
    assert done.status_code == 200 and done.json()["status"] == "completed"
    result = done.json()["result"]
    assert result["model_id"].startswith("base_lora_")
    assert (result["rank"], result["alpha"], result["target_modules"]) == (4, 8.0, ["q_proj"])
    # the server's own model name works as base_model too
    named = post(server, "/add_lora", {"base_model": "builtin-tiny"})
    assert wait(server, named.json()["request_id"]).status_code == 200


def test_train_step_shapes(server, adapter):
    r = post(server, "/fwdbwd", {"model_id": adapter, "data": [HELLO, HELLO], "loss_fn": "cross_entropy"})
    assert r.status_code == 200 and r.json()["model_id"] == adapter
    result = wait(server, r.json()["request_id"]).json()["result"]
    assert result["loss"] > 0 and result["num_sequences"] == 2 and result["num_tokens"] > result["num_loss_tokens"] > 0
    step = wait(
        server,
        post(server, "/optim_step", {"model_id": adapter, "adam_params": {"learning_rate": 1e-3}}).json()["request_id"],
    )
    assert step.json()["result"]["step"] >= 1 and step.json()["result"]["grad_norm"] > 0


def test_retrieve_future_pending_then_long_poll(server, adapter):
    # Queue several jobs on one adapter: the last is still pending right after submission.
    ids = [post(server, "/fwdbwd", {"model_id": adapter, "data": [HELLO] * 32}).json()["request_id"] for _ in range(6)]
    first = post(server, "/retrieve_future", {"request_id": ids[-1]})
    assert first.status_code == 202 and first.json()["status"] == "pending"
    started = time.monotonic()
    done = post(server, "/retrieve_future", {"request_id": ids[-1], "timeout": 30})
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert time.monotonic() - started < 20  # answered when the job finished, not at the timeout
    post(server, "/optim_step", {"model_id": adapter})


def test_sample_shapes(server, adapter):
    r = post(
        server,
        "/api/v1/sample",
        {"model_id": adapter, "prompts": ["Hello!", "Hey"], "sampling_params": {"max_tokens": 7, "temperature": 0}},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["generated_text"] == body["outputs"][0] and len(body["outputs"]) == 2
    assert all(n <= 7 for n in body["num_tokens"])
    base = post(
        server,
        "/api/v1/sample",
        {
            "model_id": "base",
            "prompts": ["Hello!"],
            "sampling_params": {
                "max_tokens": 5,
                "temperature": 0.9,
                "top_p": 0.9,
                "top_k": 20,
                "seed": 3,
                "stop": ["\n"],
            },
        },
    )
    assert base.status_code == 200


def test_save_lora_writes_peft_files(server, adapter):
    result = wait(server, post(server, "/save_lora", {"model_id": adapter}).json()["request_id"]).json()["result"]
    from pathlib import Path

    assert {p.name for p in Path(result["path"]).iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


LONG = "x" * 2000  # byte-level tokens: far past builtin-tiny's 512-token context

BAD_REQUESTS = [
    # (path, body, status, words the error message must contain)
    ("/add_lora", {"base_model": "gpt-5"}, 400, ["base_model", "allowed"]),
    ("/add_lora", {"rank": "eight"}, 400, ["rank"]),
    ("/add_lora", {"rank": 0}, 400, ["rank"]),
    ("/add_lora", {"rank": 100000}, 400, ["rank", "256"]),
    ("/add_lora", {"alpha": -1}, 400, ["alpha"]),
    ("/add_lora", {"alpha": "big"}, 400, ["alpha"]),
    ("/add_lora", {"alpha": 1e308}, 400, ["alpha"]),
    ("/add_lora", {"target_modules": ["embed_tokens"]}, 400, ["target_modules", "allowed"]),  # lm_head is allowed
    ("/add_lora", {"rnak": 8}, 400, ["rnak"]),
    ("/fwdbwd", {"data": [HELLO]}, 400, ["model_id"]),
    ("/fwdbwd", {"model_id": "ADAPTER"}, 400, ["data"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": []}, 400, ["data"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": "hello"}, 400, ["data"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": [[{"role": "user", "content": "no answer"}]]}, 400, ["assistant"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": [[{"role": "robot", "content": "x"}]]}, 400, ["role"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": [HELLO], "loss_fn": "ppo"}, 400, ["loss_fn", "cross_entropy"]),
    ("/fwdbwd", {"model_id": "ADAPTER", "data": [HELLO] * 300}, 400, ["data", "limit"]),
    ("/fwdbwd", {"model_id": "base", "data": [HELLO]}, 400, ["base model"]),
    ("/fwdbwd", {"model_id": "base_lora_nope", "data": [HELLO]}, 404, ["base_lora_nope"]),
    ("/fwdbwd", {"model_id": 5, "data": [HELLO]}, 400, ["model_id"]),
    ("/optim_step", {}, 400, ["model_id"]),
    ("/optim_step", {"model_id": "ADAPTER", "adam_params": {"learning_rate": 0}}, 400, ["learning_rate"]),
    ("/optim_step", {"model_id": "ADAPTER", "adam_params": {"learning_rate": -0.1}}, 400, ["learning_rate"]),
    ("/optim_step", {"model_id": "ADAPTER", "adam_params": {"learning_rate": "fast"}}, 400, ["learning_rate"]),
    ("/optim_step", {"model_id": "ADAPTER", "adam_params": {"beta1": 1.5}}, 400, ["beta1"]),
    ("/optim_step", {"model_id": "ADAPTER", "adam_params": [1]}, 400, ["adam_params"]),
    ("/optim_step", {"model_id": "base_lora_nope"}, 404, ["base_lora_nope"]),
    ("/retrieve_future", {}, 400, ["request_id"]),
    ("/retrieve_future", {"request_id": 7}, 400, ["request_id"]),
    ("/retrieve_future", {"request_id": "future_nope"}, 404, ["future_nope"]),
    ("/retrieve_future", {"request_id": "future_nope", "timeout": -1}, 400, ["timeout"]),
    ("/api/v1/sample", {"prompts": ["hi"]}, 400, ["model_id"]),
    ("/api/v1/sample", {"model_id": "base"}, 400, ["prompts"]),
    ("/api/v1/sample", {"model_id": "base", "prompts": []}, 400, ["prompts"]),
    ("/api/v1/sample", {"model_id": "base", "prompts": "hi"}, 400, ["prompts"]),
    (
        "/api/v1/sample",
        {"model_id": "base", "prompts": ["hi"], "sampling_params": {"max_tokens": 0}},
        400,
        ["max_tokens"],
    ),
    (
        "/api/v1/sample",
        {"model_id": "base", "prompts": ["hi"], "sampling_params": {"max_tokens": 10**6}},
        400,
        ["max_tokens", "limit"],
    ),
    (
        "/api/v1/sample",
        {"model_id": "base", "prompts": ["hi"], "sampling_params": {"temperature": -1}},
        400,
        ["temperature"],
    ),
    ("/api/v1/sample", {"model_id": "base", "prompts": ["hi"], "sampling_params": {"top_p": 0}}, 400, ["top_p"]),
    ("/api/v1/sample", {"model_id": "base", "prompts": ["hi"], "sampling_params": {"top_k": -2}}, 400, ["top_k"]),
    ("/api/v1/sample", {"model_id": "base", "prompts": [LONG]}, 400, ["context window"]),
    ("/api/v1/sample", {"model_id": "base_lora_nope", "prompts": ["hi"]}, 404, ["base_lora_nope"]),
    ("/save_lora", {"model_id": "base_lora_nope"}, 404, ["base_lora_nope"]),
]


@pytest.mark.parametrize(("path", "payload", "status", "words"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_bad_input_gets_a_clear_4xx(server, adapter, path, payload, status, words):
    payload = {k: (adapter if v == "ADAPTER" else v) for k, v in payload.items()}
    r = post(server, path, payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] in ("BadRequestError", "NotFoundError")
    for word in words:
        assert word in body["error"], body["error"]


@pytest.mark.parametrize(
    "path", ["/add_lora", "/fwdbwd", "/optim_step", "/retrieve_future", "/api/v1/sample", "/save_lora"]
)
@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b"", b'"text"', b"{bad", b"\xff\xfe", b"[" * 50_000 + b"]" * 50_000],
    ids=lambda raw: repr(raw)[:16],
)
def test_non_json_bodies_are_400(server, path, raw):
    r = post(server, path, data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "BadRequestError"


def test_unknown_route_and_method_are_json(server):
    r = requests.get(f"{server.url}/nope", timeout=10)
    assert r.status_code == 404 and r.json()["type"] == "NotFoundError"
    r = requests.get(f"{server.url}/fwdbwd", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_failing_job_fails_its_future_only(server, adapter):
    other = wait(server, post(server, "/add_lora", {"seed": 3}).json()["request_id"]).json()["result"]["model_id"]
    # Too long a sequence is refused at arrival now; a token id past the vocabulary is only
    # checked inside the worker (Tinker API, on the same adapter).
    too_long = [[{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]]
    refused = post(server, "/fwdbwd", {"model_id": adapter, "data": too_long})
    assert refused.status_code == 400 and "context window of 512" in refused.json()["error"]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 10**6], "weights": [1, 1]}
    )
    proto = forward_backward_request_to_proto(
        types.ForwardBackwardRequest(
            model_id=adapter, forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
        )
    )
    bad = post(server, "/api/v1/forward_backward", data=proto.SerializeToString(), headers=PROTOBUF)
    assert bad.status_code == 200  # accepted; it fails inside the worker
    good = [post(server, "/fwdbwd", {"model_id": other, "data": [HELLO]}).json()["request_id"] for _ in range(3)]
    failed = wait(server, bad.json()["request_id"])
    assert failed.status_code == 500
    assert failed.json()["status"] == "failed" and "token ids must lie in" in failed.json()["error"]
    for request_id in good:
        assert wait(server, request_id).json()["status"] == "completed"
    # the adapter whose job failed keeps working too
    after = wait(server, post(server, "/fwdbwd", {"model_id": adapter, "data": [HELLO]}).json()["request_id"])
    assert after.json()["status"] == "completed"
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
