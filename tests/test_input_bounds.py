"""Client-declared sizes and values on a live server: every size that drives an allocation
is bounded before anything is built (400 naming the limit), malformed tensor headers and
over-long sequences are refused at arrival, overflowing loss inputs fail as the user's
error, errors never echo large input back, and /healthz shows no filesystem path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
from tinker.proto import tinker_public_pb2 as pb

pytestmark = pytest.mark.e2e

PROTOBUF = {"Content-Type": "application/x-protobuf"}
SHORT_POLL = {"x-stainless-read-timeout": "10"}  # a retrieve_future long-poll of 5 s
TOKENS = [72, 105, 33, 10, 72, 105, 33, 10]  # T = 8
WINDOW = 512  # builtin-tiny's context window


def post(server, path: str, body=None, data=None, headers=None) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, data=data, headers=headers, timeout=120)


def wait(server, request_id: str) -> requests.Response:
    return post(server, "/retrieve_future", {"request_id": request_id, "timeout": 60})


def new_adapter(server) -> str:
    queued = post(server, "/add_lora", {"rank": 4, "alpha": 8.0, "seed": 1}).json()
    return wait(server, queued["request_id"]).json()["result"]["model_id"]


def tinker_outcome(server, request_id: str) -> dict | None:
    """A Tinker future's failure ({"error", "category"}), or None once it completed."""
    for _ in range(60):
        r = post(server, "/api/v1/retrieve_future", {"request_id": request_id}, headers=SHORT_POLL)
        if "json" not in r.headers["Content-Type"]:
            return None  # completed: the result came as protobuf
        answer = r.json()
        if answer.get("type") != "try_again":
            return answer
    raise AssertionError(f"{request_id} never finished")


# ---- Tinker wire bodies, built field by field (a client may send any header) ----------------


def dense(values, dtype=pb.DTYPE_FLOAT32, shape=None) -> pb.Tensor:
    array = np.asarray(values, dtype="<f4" if dtype == pb.DTYPE_FLOAT32 else "<i8")
    return pb.Tensor(dtype=dtype, shape=list(array.shape) if shape is None else shape, dense=array.tobytes())


def csr(shape, dtype=pb.DTYPE_INT64, crow=None) -> pb.Tensor:
    """A sparse (rows, K) tensor holding one entry, at (0, 0): a few bytes for any K."""
    tensor = pb.Tensor(dtype=dtype, shape=list(shape))
    value = np.array([5], dtype="<i8" if dtype == pb.DTYPE_INT64 else "<f4")
    tensor.sparse_csr.values = value.tobytes()
    crow = [0] + [1] * shape[0] if crow is None else crow
    tensor.sparse_csr.crow_indices = np.asarray(crow, dtype="<i8").tobytes()
    tensor.sparse_csr.col_indices = np.array([0], dtype="<i8").tobytes()
    return tensor


def datum(inputs: dict[str, pb.Tensor], tokens=TOKENS, raw_tokens: bytes | None = None) -> pb.Datum:
    message = pb.Datum()
    chunk = message.model_input.add()
    chunk.encoded_text.tokens = np.asarray(tokens, dtype="<i4").tobytes() if raw_tokens is None else raw_tokens
    for key, value in inputs.items():
        message.loss_fn_inputs[key].CopyFrom(value)
    return message


def sft(tokens=TOKENS, weight: float = 1.0, targets=None) -> pb.Datum:
    targets = tokens if targets is None else targets
    return datum({"target_tokens": dense(targets, pb.DTYPE_INT64), "weights": dense([weight] * len(tokens))}, tokens)


def fwdbwd_body(model_id: str, data, loss_fn="cross_entropy", config=None, seq_id=0) -> bytes:
    message = pb.ForwardBackwardRequest(model_id=model_id, loss_fn=loss_fn, seq_id=seq_id)
    for d in data:
        message.data.add().CopyFrom(d)
    for key, value in (config or {}).items():
        message.loss_fn_config[key] = value
    return message.SerializeToString()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return new_adapter(server)


@pytest.fixture(scope="module")
def small(start_server):
    """A server with small size limits, where a request can exceed them cheaply."""
    return start_server(MAX_TARGET_K="8", MAX_REQUEST_ELEMENTS="4096")


# ---- amplification: sizes a few bytes can declare -------------------------------------------


def test_a_tiny_sparse_body_declaring_gigabytes_is_refused_before_allocating(server, model_id):
    """The reported attack: ~300 bytes declaring (8, 4,000,000) CSR targets and weights."""
    body = fwdbwd_body(
        model_id,
        [datum({"target_tokens": csr((8, 4_000_000)), "weights": csr((8, 4_000_000), pb.DTYPE_FLOAT32)})],
    )
    assert len(body) < 400
    before = rss_bytes(server.proc.pid)
    r = post(server, "/api/v1/forward_backward", data=body, headers=PROTOBUF)
    assert r.status_code == 400, r.text
    assert "MAX_TARGET_K" in r.json()["error"] and "4000000" in r.json()["error"]
    assert rss_bytes(server.proc.pid) - before < 200 * 1024 * 1024
    # Nothing was queued: the adapter trains at once.
    queued = post(server, "/api/v1/forward_backward", data=fwdbwd_body(model_id, [sft()]), headers=PROTOBUF)
    assert tinker_outcome(server, queued.json()["request_id"]) is None


BAD_TENSORS = [
    # (name, loss_fn_inputs or a whole datum, words the 400 must contain)
    ("negative-shape", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64), "weights": dense([1.0] * 8, shape=[-1])},
     ["weights", ">= 0"]),
    ("negative-k", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64, shape=[8, -1]), "weights": dense([1.0] * 8)},
     ["target_tokens", ">= 0"]),
    ("zero-k", {"target_tokens": dense([], pb.DTYPE_INT64, shape=[8, 0]), "weights": dense([1.0] * 8)},
     ["target_tokens", "MAX_TARGET_K"]),
    ("rows-not-tokens", {"target_tokens": dense(TOKENS * 2, pb.DTYPE_INT64), "weights": dense([1.0] * 16)},
     ["shape [16]", "8 input tokens"]),
    ("short-data", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64), "weights": dense([1.0] * 7, shape=[8])},
     ["weights", "bytes"]),
    ("three-d", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64, shape=[8, 1, 1]), "weights": dense([1.0] * 8)},
     ["target_tokens", "shape"]),
    ("csr-1d", {"target_tokens": csr((8,), crow=[0, 1]), "weights": dense([1.0] * 8)}, ["target_tokens", "2-D"]),
    ("csr-short-crow", {"target_tokens": csr((8, 4), crow=[0, 1]), "weights": dense([1.0] * 8)},
     ["target_tokens", "CSR"]),
    ("k-over-limit", {"target_tokens": csr((8, 65)), "weights": dense([1.0] * 8)}, ["MAX_TARGET_K", "65"]),
    ("nan-weight", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64), "weights": dense([math.nan] + [1.0] * 7)},
     ["weights", "finite"]),
    ("inf-weight", {"target_tokens": dense(TOKENS, pb.DTYPE_INT64), "weights": dense([math.inf] * 8)},
     ["weights", "finite"]),
    ("torn-tokens", datum({"target_tokens": dense([1], pb.DTYPE_INT64)}, raw_tokens=b"\x01\x02"), ["int32"]),
    ("over-window", sft(list(range(1, 601))), ["context window of 512"]),
]


@pytest.mark.parametrize(("name", "inputs", "words"), BAD_TENSORS, ids=[case[0] for case in BAD_TENSORS])
def test_malformed_or_oversized_tensors_are_400_at_arrival(server, model_id, name, inputs, words):
    one = inputs if isinstance(inputs, pb.Datum) else datum(inputs)
    r = post(server, "/api/v1/forward_backward", data=fwdbwd_body(model_id, [one]), headers=PROTOBUF)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "BadRequestError"
    for word in words:
        assert word in r.json()["error"], r.json()["error"]


def test_the_dense_size_of_a_whole_request_is_bounded(small):
    """Each datum is within K and T, but examples x longest x widest K is over MAX_REQUEST_ELEMENTS."""
    adapter = new_adapter(small)
    tokens = [65] * 100
    wide = datum({"target_tokens": csr((100, 8)), "weights": csr((100, 8), pb.DTYPE_FLOAT32)}, tokens)
    narrow = [sft(tokens)] * 7  # padded to the wide one's K in a pass
    r = post(small, "/api/v1/forward_backward", data=fwdbwd_body(adapter, [wide, *narrow]), headers=PROTOBUF)
    assert r.status_code == 400, r.text
    assert "MAX_REQUEST_ELEMENTS" in r.json()["error"] and "6400" in r.json()["error"]
    too_wide = datum({"target_tokens": csr((8, 9)), "weights": csr((8, 9), pb.DTYPE_FLOAT32)})
    r = post(small, "/api/v1/forward_backward", data=fwdbwd_body(adapter, [too_wide]), headers=PROTOBUF)
    assert r.status_code == 400 and "MAX_TARGET_K" in r.json()["error"]
    fits = post(small, "/api/v1/forward_backward", data=fwdbwd_body(adapter, [wide]), headers=PROTOBUF)
    assert tinker_outcome(small, fits.json()["request_id"]) is None  # 100 x 8: within the limit


def test_a_refused_request_still_takes_its_turn(server):
    """A 400 for seq_id 1 must not leave a hole that holds seq_id 2 (for 30 s)."""
    adapter = new_adapter(server)
    bad = fwdbwd_body(adapter, [datum({"target_tokens": csr((8, 10**6)), "weights": dense([1.0] * 8)})], seq_id=1)
    assert post(server, "/api/v1/forward_backward", data=bad, headers=PROTOBUF).status_code == 400
    good = post(server, "/api/v1/forward_backward", data=fwdbwd_body(adapter, [sft()], seq_id=2), headers=PROTOBUF)
    done = post(server, "/retrieve_future", {"request_id": good.json()["request_id"], "timeout": 20})
    assert done.json()["status"] == "completed", done.text


# ---- sequence lengths against the context window ----------------------------------------------

LONG_CHAT = [{"role": "user", "content": "x" * 600}, {"role": "assistant", "content": "ok"}]  # > 512 tokens


def tinker_sample(prompt_tokens: int, **extra) -> dict:
    return {
        "base_model": "builtin-tiny",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72] * prompt_tokens}]},
        **extra,
    }


OVER_WINDOW = [
    # (path, body, words the 400 must contain)
    ("/fwdbwd", {"data": [LONG_CHAT]}, ["data[0]", "context window of 512"]),
    ("/api/v1/sample", {"prompts": ["x" * 450], "sampling_params": {"max_tokens": 100}}, ["max_tokens", "512"]),
    ("/api/v1/asample", tinker_sample(450, sampling_params={"max_tokens": 100}), ["max_tokens", "512"]),
    ("/api/v1/asample", tinker_sample(600, sampling_params={"max_tokens": 1}, prompt_logprobs=True), ["512"]),
    ("/api/v1/asample", tinker_sample(8, sampling_params={"stop": [1] * 1000}), ["stop"]),
    ("/api/v1/asample", tinker_sample(8, num_samples=10_000), ["num_samples", "limit"]),
    ("/api/v1/asample", tinker_sample(8, topk_prompt_logprobs=10**6), ["topk_prompt_logprobs"]),
]


@pytest.mark.parametrize(("path", "payload", "words"), OVER_WINDOW, ids=lambda v: str(v)[:30])
def test_requests_past_the_context_window_or_limits_are_400(server, model_id, path, payload, words):
    payload = {"model_id": model_id, **payload} if not path.startswith("/api/v1/asample") else payload
    r = post(server, path, payload)
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"], r.json()["error"]


def test_sampling_without_max_tokens_stops_at_the_window(server):
    r = post(server, "/api/v1/asample", tinker_sample(500, sampling_params={"stop": [], "temperature": 1.0}))
    assert r.status_code == 200, r.text
    assert tinker_outcome(server, r.json()["request_id"]) is None


# ---- overflowing loss inputs are the user's error ---------------------------------------------


def rl(advantage: float, logprob: float = -5.5) -> pb.Datum:
    return datum(
        {"target_tokens": dense(TOKENS, pb.DTYPE_INT64), "logprobs": dense([logprob] * 8),
         "advantages": dense([advantage] + [0.0] * 7)}
    )


OVERFLOWS = [
    # (name, loss_fn, datum, loss_fn_config, words in the failure)
    # unlikely targets (log-probabilities near -5): 8 x 5 x 3e38 overflows float32
    ("huge-weights", "cross_entropy", sft(weight=3e38, targets=[1] * 8), None, ["not finite"]),
    ("huge-negative-weights", "cross_entropy", sft(weight=-3e38, targets=[1] * 8), None, ["not finite"]),
    ("huge-ratio", "importance_sampling", rl(1e10, logprob=-80.0), None, ["not finite"]),
    ("nan-clip", "ppo", rl(1.0), {"clip_low_threshold": math.nan}, ["clip_low_threshold", "finite"]),
    ("inf-clip", "cispo", rl(1.0), {"clip_high_threshold": math.inf}, ["clip_high_threshold", "finite"]),
    ("crossed-clip", "ppo", rl(1.0), {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}, ["clip_low_threshold"]),
    ("nan-beta", "dro", rl(1.0), {"beta": math.nan}, ["beta", "finite"]),
]


@pytest.mark.parametrize(("name", "loss_fn", "one", "config", "words"), OVERFLOWS, ids=[c[0] for c in OVERFLOWS])
def test_overflowing_loss_inputs_fail_as_user_errors(server, name, loss_fn, one, config, words):
    adapter = new_adapter(server)
    r = post(server, "/api/v1/forward_backward", data=fwdbwd_body(adapter, [one], loss_fn, config), headers=PROTOBUF)
    failure = r.json() if r.status_code == 400 else tinker_outcome(server, r.json()["request_id"])
    assert failure is not None, "the request should have failed"
    assert r.status_code == 400 or failure["category"] == "user", failure
    for word in words:
        assert word in failure["error"], failure["error"]


def test_an_overflowing_gradient_fails_the_step_as_a_user_error(server):
    adapter = new_adapter(server)
    # The loss is a finite -1e37 (the ratio is at most 1); its gradient through the model is not.
    body = fwdbwd_body(adapter, [rl(1e37, logprob=0.0)], "importance_sampling")
    r = post(server, "/api/v1/forward_backward", data=body, headers=PROTOBUF)
    assert tinker_outcome(server, r.json()["request_id"]) is None  # the loss itself is finite
    step = post(server, "/api/v1/optim_step", {"model_id": adapter, "adam_params": {"learning_rate": 1e-2}})
    failure = tinker_outcome(server, step.json()["request_id"])
    assert failure["category"] == "user" and "not finite" in failure["error"]


# ---- errors quote client input briefly; /healthz shows no paths ------------------------------

HUGE = "k" * 10_000_000


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/add_lora", {HUGE: 1}),  # an unknown key (pydantic quotes it)
        ("/fwdbwd", {"model_id": HUGE, "data": [LONG_CHAT]}),  # an unknown id (404 quotes it)
        ("/api/v1/asample", {"sampling_session_id": HUGE, "prompt": {"chunks": [{"tokens": [1]}]}}),
        ("/api/v1/forward_backward", None),  # a loss function's name
    ],
    ids=["unknown-key", "unknown-model", "unknown-sampler", "loss-fn-name"],
)
def test_errors_never_echo_large_input(server, model_id, path, payload):
    if payload is None:
        r = post(server, path, data=fwdbwd_body(model_id, [sft()], loss_fn=HUGE), headers=PROTOBUF)
        error = r.json()["error"] if r.status_code >= 400 else tinker_outcome(server, r.json()["request_id"])["error"]
    else:
        r = post(server, path, payload)
        assert 400 <= r.status_code < 500, r.status_code
        error = r.json()["error"]
    assert len(error) <= 2100 and "k" * 250 not in error, len(error)
    assert len(r.content) < 4000


def test_healthz_shows_no_filesystem_paths(server, cache_dir):
    body = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert body["base_model"] == "builtin-tiny"
    assert "model_path" not in body
    assert str(cache_dir) not in json.dumps(body)
