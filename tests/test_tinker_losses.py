"""gspo and stable_reinforce through the official SDK: sampling with record_stability_info,
sequence_ids on the returned sequences, provenance on the training datums, and the refusals
when the provenance does not hold."""

from __future__ import annotations

import math

import pytest
import requests
import tinker
import torch
from tinker import types

pytestmark = pytest.mark.e2e

PROMPT = [72, 105, 58, 32]


def _sample(sampler, n: int = 3):
    params = types.SamplingParams(max_tokens=5, stop=[], temperature=1.0, seed=3)
    return sampler.sample(types.ModelInput.from_ints(PROMPT), n, params).result().sequences


def _datum(seq, advantage: float, provenance: bool = True) -> types.Datum:
    """As recipes/rl_loop.py builds them (with_sampled_provenance)."""
    n_prompt = len(PROMPT) - 1
    tokens = PROMPT + seq.tokens
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens),
        },
    )
    if not provenance:
        return datum
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=seq.sequence_id, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(seq.tokens) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=n_prompt),
            types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(seq.tokens)),
        ],
    )


def test_stable_reinforce_trains_on_recorded_sequences(training):
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    sequences = _sample(sampler)
    assert len({s.sequence_id for s in sequences}) == 3
    advantages = [1.0, -0.5, -0.5]
    data = [_datum(s, a) for s, a in zip(sequences, advantages, strict=True)]
    # The client's logprobs are not what the loss reads: the recorded ones are.
    for datum in data:
        datum.loss_fn_inputs["logprobs"] = types.TensorData.from_torch(torch.zeros(datum.model_input.length))
    result = training.forward_backward(data, "stable_reinforce").result()
    expected = 0.0
    for output, seq, adv in zip(result.loss_fn_outputs, sequences, advantages, strict=True):
        lp = output["logprobs"].to_torch()[len(PROMPT) - 1 :].double()
        q = torch.tensor(seq.logprobs, dtype=torch.float64)
        torch.testing.assert_close(lp, q, atol=1e-4, rtol=0)  # on policy: the same logprobs
        expected -= float((torch.exp(lp - q).clamp(max=1.0) * lp * adv).sum())
    assert result.metrics["loss:sum"] == pytest.approx(expected, abs=1e-4)
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_stable_reinforce_refuses_what_its_provenance_does_not_back(server, training):
    recording = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    seq = _sample(recording, 1)[0]
    unrecorded = _sample(training.save_weights_and_get_sampling_client().result(), 1)[0]
    cases = {
        "needs provenance": [_datum(seq, 1.0, provenance=False)],
        "not a recorded sequence": [_datum(unrecorded, 1.0)],
    }
    tampered = _datum(seq, 1.0)
    targets = tampered.loss_fn_inputs["target_tokens"].to_torch()
    targets[-1] = (int(targets[-1]) + 1) % 250
    tampered.loss_fn_inputs["target_tokens"] = types.TensorData.from_torch(targets)
    cases["are not the tokens"] = [tampered]
    on_prompt = _datum(seq, 1.0)
    advantages = on_prompt.loss_fn_inputs["advantages"].to_torch()
    advantages[0] = 1.0
    on_prompt.loss_fn_inputs["advantages"] = types.TensorData.from_torch(advantages)
    cases["nonzero at a prompt position"] = [on_prompt]
    for message, data in cases.items():
        with pytest.raises(tinker.RequestFailedError, match=message):
            training.forward_backward(data, "stable_reinforce").result()
    # Another session cannot train on this session's sequences.
    other = tinker.ServiceClient(base_url=server.url, api_key="tml-test-key")
    try:
        stranger = other.create_lora_training_client(base_model="builtin-tiny", rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="not a recorded sequence of this session"):
            stranger.forward_backward([_datum(seq, 1.0)], "stable_reinforce").result()
    finally:
        other.close("success").result()
    # The failed requests took their turns; the genuine one still trains.
    assert "loss:sum" in training.forward_backward([_datum(seq, 1.0)], "stable_reinforce").result().metrics


def test_gspo_clips_the_sequence_ratio(training):
    sampler = training.save_weights_and_get_sampling_client().result()
    sequences = _sample(sampler, 2)
    data = [_datum(s, a, provenance=False) for s, a in zip(sequences, [1.0, -1.0], strict=True)]
    n_prompt = len(PROMPT) - 1
    for datum, seq in zip(data, sequences, strict=True):  # as rl_loop.py does for gspo
        mask = [0.0] * n_prompt + [1.0] * len(seq.tokens)
        datum.loss_fn_inputs["sequence_ratio_mask"] = types.TensorData.from_torch(torch.tensor(mask))
    # Shift the sampler logprobs so each sequence ratio is exactly e^0.1 (above a 1.05 bound).
    for datum in data:
        q = datum.loss_fn_inputs["logprobs"].to_torch()
        q[n_prompt:] -= 0.1
        datum.loss_fn_inputs["logprobs"] = types.TensorData.from_torch(q)
    config = {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}
    result = training.forward_backward(data, "gspo", config).result()
    s = math.exp(0.1)
    # A > 0: min(s·A, 1.05·A) = 1.05 per token; A < 0: min(-s, -1.05) = -s per token.
    expected = -(1.05 * len(sequences[0].tokens)) + s * len(sequences[1].tokens)
    assert result.metrics["loss:sum"] == pytest.approx(expected, abs=1e-3)


def test_recording_needs_a_sampling_session(server):
    """A stateless sample has no session to own what it would record."""
    body = {
        "base_model": "builtin-tiny", "num_samples": 1, "record_stability_info": True,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 2},
    }
    answer = requests.post(f"{server.url}/api/v1/asample", json=body, headers={"X-API-Key": "tml-test-key"})
    assert answer.status_code == 400 and "record_stability_info" in answer.json()["error"]
