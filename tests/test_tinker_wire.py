"""The Tinker wire formats and request ordering: bodies encoded by the SDK's own
converters decode here, what we encode the SDK decodes, and Sequencer keeps seq_id order."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from thinker.core.errors import BadRequestError
from thinker.http.tinker import sessions, wire
from thinker.store.database import Database
from worker_pool import WorkerPool

pytestmark = pytest.mark.unit


def sdk_body(data, loss_fn="cross_entropy", config=None) -> bytes:
    request = types.ForwardBackwardRequest(
        model_id="s:train:0",
        seq_id=3,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_forward_backward_request_decodes_dense_sparse_and_compressed():
    top_k = torch.zeros(4, 3, dtype=torch.long)
    top_k[0, 0], top_k[2, 1], top_k[3, 2] = 7, 9, 11  # mostly zeros: the SDK sends it as sparse CSR
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, 0.5]},
        ),
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
            loss_fn_inputs={"target_tokens": top_k, "weights": torch.full((4, 3), 0.25)},
        ),
    ]
    body = sdk_body(data, "ppo", {"clip_low_threshold": 0.7, "mode": "token"})
    for encoding, raw in ((None, body), ("zstd", zstandard.ZstdCompressor().compress(body))):
        message = wire.parse_forward_backward(wire.decompress(raw, encoding))
        assert (message.model_id, message.seq_id, message.loss_fn) == ("s:train:0", 3, "ppo")
        assert wire.loss_config(message) == {"clip_low_threshold": 0.7, "mode": "token"}
        first, second = wire.examples(message, wire.Bounds(max_k=64, max_elements=10**6))
        assert first.input_tokens.tolist() == [1, 2, 3] and first.target_tokens.tolist() == [2, 3, 4]
        assert first.weights.tolist() == [0.0, 1.0, 0.5]
        assert torch.equal(second.target_tokens, top_k) and second.weights.shape == (4, 3)


def test_garbage_bodies_are_bad_requests():
    with pytest.raises(BadRequestError):
        wire.parse_forward_backward(b"\xff\xff\xff\xff")
    with pytest.raises(BadRequestError, match="zstd"):
        wire.decompress(b"not zstd", "zstd")
    bad = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2, 2])
    bad.sparse_csr.values = np.array([1, 2], dtype="<i8").tobytes()
    bad.sparse_csr.crow_indices = np.array([0, 5, 2], dtype="<i8").tobytes()  # out of range
    bad.sparse_csr.col_indices = np.array([0, 9], dtype="<i8").tobytes()
    with pytest.raises(BadRequestError, match="target_tokens"):
        wire.tensor(bad, "target_tokens")
    short = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], dense=np.zeros(2, dtype="<f4").tobytes())
    with pytest.raises(BadRequestError, match="weights"):
        wire.tensor(short, "weights")


def test_outputs_decode_with_the_sdk():
    logprobs = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5]), torch.tensor([[-1.0, -3.0], [-2.0, -4.0]])]
    decoded = deserialize_forward_backward_output(wire.forward_backward_output(logprobs, {"loss:sum": 4.5}))
    assert decoded.metrics == {"loss:sum": 4.5}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [t.tolist() for t in logprobs]
    result = {
        "sequences": [{"tokens": [5, 6], "logprobs": [-0.1, -0.2], "stop_reason": "stop"}],
        "prompt_logprobs": [None, -1.5, -2.5],
        "topk_prompt_logprobs": [None, [(3, -0.5), (4, -1.5)], [(9, -0.25)]],
    }
    sample = deserialize_sample_response(wire.sample_response(result))
    assert sample.sequences[0].tokens == [5, 6] and sample.sequences[0].stop_reason == "stop"
    assert sample.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert sample.prompt_logprobs == [None, -1.5, -2.5]
    assert sample.topk_prompt_logprobs == [None, [(3, -0.5), (4, -1.5)], [(9, -0.25)]]


def test_sequencer_runs_in_seq_order_and_answers_resends_with_the_same_id(tmp_path):
    pool = WorkerPool(1)
    db = Database(tmp_path / "thinker.db")
    seq = sessions.Sequencer(pool, "m", db)
    started: list[int] = []

    def start(n):
        return lambda future: (started.append(n), pool.submit("m", "t", lambda: n, future=future))

    ids = {n: seq.admit(n, "t", start(n)) for n in (3, 2)}  # arrive out of order: held
    assert started == []
    ids[1] = seq.admit(1, "t", start(1))
    assert started == [1, 2, 3]
    assert seq.admit(2, "t", start(99)) == ids[2]  # a resend is the same request
    assert [pool.get(ids[n]).wait(5) and pool.get(ids[n]).result for n in (1, 2, 3)] == [1, 2, 3]
    # A new Sequencer on the same database (after a restart) goes on at seq_id 4 and still
    # knows the ids it gave.
    again = sessions.Sequencer(pool, "m", db)
    assert again.next_seq == 4 and again.admit(2, "t", start(99)) == ids[2]
    pool.shutdown()


class ManualTimer:
    """Stands in for threading.Timer in sessions.py: fires only when the test says so."""

    made: list[ManualTimer] = []

    def __init__(self, interval: float, function) -> None:
        self.interval, self.function, self.daemon = interval, function, False
        ManualTimer.made.append(self)

    def start(self) -> None:
        pass

    def fire(self) -> None:
        self.function()


def test_sequencer_goes_on_after_a_gap(monkeypatch, tmp_path):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sessions, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    monkeypatch.setattr(sessions, "threading", SimpleNamespace(Lock=threading.Lock, Timer=ManualTimer))
    ManualTimer.made.clear()
    pool = WorkerPool(1)
    seq = sessions.Sequencer(pool, "m", Database(tmp_path / "thinker.db"))
    started: list[int] = []
    seq.admit(2, "t", lambda future: (started.append(2), pool.fail(future, BadRequestError("x"))))
    assert started == [] and [t.interval for t in ManualTimer.made] == [sessions.GAP_TIMEOUT_S]
    clock.now += sessions.GAP_TIMEOUT_S / 2
    ManualTimer.made[-1].fire()  # early (a timer may fire before its time): still held
    assert started == [] and len(ManualTimer.made) == 2
    clock.now += sessions.GAP_TIMEOUT_S / 2
    ManualTimer.made[-1].fire()  # seq_id 1 never came: 2 goes on without it
    assert started == [2] and seq.next_seq == 3
    late = seq.admit(1, "t", lambda future: (started.append(1), pool.submit("m", "t", lambda: 1, future=future)))
    assert started == [2]  # the late one never runs: it would run out of order
    record = pool.get(late)  # (admit answers the future id)
    assert record.wait(5) and record.status == "failed" and "gap was skipped" in record.error
    pool.shutdown()
