"""Faults inside jobs fail that one future, with the reason, and nothing else: a real
out-of-memory error, a non-finite loss or gradient, a corrupt checkpoint file."""

from __future__ import annotations

import math
import resource
from pathlib import Path

import pytest
import requests
import tinker
from tinker import types

pytestmark = pytest.mark.e2e

LONG_CHAT = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y" * 250}]


class Http:
    def __init__(self, server) -> None:
        self.url = server.url

    def post(self, path: str, body: dict) -> dict:
        return requests.post(f"{self.url}{path}", json=body, timeout=120).json()

    def wait(self, request_id: str) -> dict:
        return self.post("/retrieve_future", {"request_id": request_id, "timeout": 120})

    def run(self, path: str, body: dict) -> dict:
        return self.wait(self.post(path, body)["request_id"])


@pytest.mark.slow
def test_out_of_memory_fails_only_that_request(start_server):
    """The server process gets an address-space limit (prlimit) a few hundred MB above what it
    uses; a request too big for that fails with a real allocation error from torch."""
    server = start_server(MAX_EXAMPLES_PER_REQUEST="4096")
    http = Http(server)
    make = {"rank": 4, "alpha": 8.0, "seed": 5}
    victim, bystander, reference = (http.run("/add_lora", make)["result"]["model_id"] for _ in range(3))
    http.run("/fwdbwd", {"model_id": reference, "data": [LONG_CHAT]})  # warm up every code path
    vm_kb = next(int(line.split()[1]) for line in open(f"/proc/{server.proc.pid}/status") if line.startswith("VmSize"))
    limit = (vm_kb + 400_000) * 1024
    resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (limit, limit))

    huge = http.post("/fwdbwd", {"model_id": victim, "data": [LONG_CHAT] * 2048})  # ~3 GB of activations
    small = http.post("/fwdbwd", {"model_id": bystander, "data": [LONG_CHAT]})
    failed = http.wait(huge["request_id"])
    assert failed["status"] == "failed" and failed["error"].startswith("out of memory running a forward-backward")
    assert "2048 sequences" in failed["error"] and "can't allocate memory" in failed["error"]
    assert http.wait(small["request_id"])["status"] == "completed"

    # The failed pass left no gradient behind: one small step now equals the reference's.
    for model_id in (victim, reference):
        http.run("/fwdbwd", {"model_id": model_id, "data": [LONG_CHAT]})
        http.run("/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})
    losses = [http.run("/fwdbwd", {"model_id": m, "data": [LONG_CHAT]})["result"]["loss"] for m in (victim, reference)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert requests.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"


def _rl_datum(advantage: float, sampler_logprob: float = -5.5) -> types.Datum:
    tokens = [72, 105, 33, 10]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": tokens[1:] + [72],
            "logprobs": [sampler_logprob] * 4,
            "advantages": [advantage, 0.0, 0.0, 0.0],
        },
    )


def test_non_finite_loss_and_gradient_never_reach_the_weights(service):
    training = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=2).result()
    probe = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    before = training.forward([probe], "cross_entropy").result().metrics["loss:sum"]

    # Values this large overflow float32: in the loss itself (the ratio is e^72)...
    with pytest.raises(tinker.RequestFailedError, match="the loss is not finite"):
        training.forward_backward([_rl_datum(1e10, sampler_logprob=-80.0)], "importance_sampling").result()
    # ... or only in the gradient (the loss is a finite -8e35): the step refuses it.
    loss = training.forward_backward([_rl_datum(1e37)], "importance_sampling").result().metrics["loss:sum"]
    assert math.isfinite(loss)
    with pytest.raises(tinker.RequestFailedError, match="gradient .* is not finite"):
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert training.forward([probe], "cross_entropy").result().metrics["loss:sum"] == before  # untouched

    # Training goes on normally afterwards.
    training.forward_backward([probe], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert training.forward([probe], "cross_entropy").result().metrics["loss:sum"] < before


def test_a_corrupt_checkpoint_fails_its_load_only(server):
    http = Http(server)
    model_id = http.run("/add_lora", {"rank": 4, "alpha": 8.0})["result"]["model_id"]
    path = http.run("/save_state", {"model_id": model_id, "name": "to-corrupt"})["result"]["path"]
    run_id, kind, name = path.removeprefix("tinker://").split("/")
    weights = Path(server.env["THINKER_DATA_DIR"]) / "checkpoints" / run_id / kind / name / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64)  # a disk gone bad

    failed = http.run("/load_state", {"path": path})
    assert failed["status"] == "failed" and failed["error"]
    assert http.run("/fwdbwd", {"model_id": model_id, "data": [LONG_CHAT[:2]]})["status"] == "completed"
