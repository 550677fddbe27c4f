"""The official ``tinker`` SDK, unchanged, against a live server on builtin-tiny.

Each test drives the SDK as its users do (ServiceClient -> TrainingClient / SamplingClient
/ RestClient) over HTTP, and checks what comes back against independent computations.
"""

from __future__ import annotations

import math

import pytest
import requests
import tinker
import torch
from tinker import types

pytestmark = pytest.mark.e2e

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
]


def sft_datum(tokenizer, conversation) -> types.Datum:
    """A cookbook-style supervised datum: loss on the assistant's reply only."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * (len(ids) - len(prompt_ids))
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )


def mean_nll(result, data) -> float:
    total = weight = 0.0
    for output, datum in zip(result.loss_fn_outputs, data, strict=True):
        lp, w = output["logprobs"].to_torch(), datum.loss_fn_inputs["weights"].to_torch()
        total -= float((lp * w).sum())
        weight += float(w.sum())
    return total / weight


def test_capabilities_list_the_base_model(server):
    caps = tinker.RestClient(base_url=server.url, api_key="tml-test-key").get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == ["builtin-tiny"]


def test_supervised_loop_lowers_the_loss(training):
    tokenizer = training.get_tokenizer()  # offline: the server reports a local tokenizer folder
    data = [sft_datum(tokenizer, c) for c in CONVERSATIONS]
    losses = []
    for _ in range(8):
        # As the cookbook does: queue forward_backward and optim_step, then wait.
        fwd = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=5e-3))
        result = fwd.result()
        opt.result()
        losses.append(mean_nll(result, data))
        # loss:sum is the weighted NLL summed over every datum (no averaging)
        total_weight = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)
        assert result.metrics["loss:sum"] == pytest.approx(losses[-1] * total_weight, rel=1e-4)
    assert losses[-1] < 0.7 * losses[0], losses


def test_forward_matches_forward_backward_and_keeps_shapes(training):
    tokenizer = training.get_tokenizer()
    data = [sft_datum(tokenizer, c) for c in CONVERSATIONS]
    forward = training.forward(data, "cross_entropy").result()
    for output, datum in zip(forward.loss_fn_outputs, data, strict=True):
        assert output["logprobs"].shape == datum.loss_fn_inputs["target_tokens"].shape
        assert all(v <= 0 for v in output["logprobs"].data)


def _rl_batch(training, sampler, loss_fn: str, config: dict | None):
    tokenizer = training.get_tokenizer()
    prompt = tokenizer.encode("Count: ", add_special_tokens=False)
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    out = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
    rewards = [float(sum(1 for t in s.tokens if t % 2 == 0)) for s in out.sequences]
    baseline = sum(rewards) / len(rewards)
    data = []
    for seq, reward in zip(out.sequences, rewards, strict=True):
        tokens = prompt + seq.tokens
        n_prompt = len(prompt) - 1
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [reward - baseline] * len(seq.tokens),
                },
            )
        )
    result = training.forward_backward(data, loss_fn, config).result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return data, result


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})],
)
def test_rl_step(training, loss_fn, config):
    sampler = training.save_weights_and_get_sampling_client().result()
    data, result = _rl_batch(training, sampler, loss_fn, config)
    expected = 0.0
    for output, datum in zip(result.loss_fn_outputs, data, strict=True):
        lp = output["logprobs"].to_torch()
        q, adv = datum.loss_fn_inputs["logprobs"].to_torch(), datum.loss_fn_inputs["advantages"].to_torch()
        sampled = adv != 0
        # On-policy: the trainer's logprobs of the sampled tokens are the sampler's.
        torch.testing.assert_close(lp[sampled], q[sampled], atol=1e-4, rtol=0)
        ratio = torch.exp(lp - q)
        if loss_fn == "ppo":
            expected -= float(torch.minimum(ratio * adv, ratio.clamp(0.9, 1.1) * adv).sum())
        else:
            expected -= float((ratio * adv).sum())
    assert result.metrics["loss:sum"] == pytest.approx(expected, abs=1e-4)


def test_save_state_then_load_state_gives_identical_logprobs(service, training):
    data = [sft_datum(training.get_tokenizer(), c) for c in CONVERSATIONS]
    path = training.save_state("roundtrip").result().path
    assert path.startswith("tinker://") and "/weights/roundtrip" in path
    before = training.forward(data, "cross_entropy").result()
    restored = service.create_training_client_from_state_with_optimizer(path).result()
    after = restored.forward(data, "cross_entropy").result()
    for a, b in zip(before.loss_fn_outputs, after.loss_fn_outputs, strict=True):
        assert a["logprobs"].data == b["logprobs"].data
    # Train the original further, then load the checkpoint back into it: the logprobs return.
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    changed = training.forward(data, "cross_entropy").result()
    assert changed.loss_fn_outputs[0]["logprobs"].data != before.loss_fn_outputs[0]["logprobs"].data
    training.load_state(path).result()
    again = training.forward(data, "cross_entropy").result()
    assert again.loss_fn_outputs[0]["logprobs"].data == before.loss_fn_outputs[0]["logprobs"].data


def test_sampler_weights_saved_again_under_one_name_serve_the_new_weights(service):
    """RL loops often save to one name ("latest") every step: a sampler made after the second
    save samples the second weights, not a cached copy of the first."""
    training = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=7).result()
    ids = [72, 105, 33, 10, 72]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )

    def sampler_logprobs() -> list[float]:
        path = training.save_weights_for_sampler("latest").result().path
        sampler = service.create_sampling_client(model_path=path).result()
        return sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()[1:]

    first = sampler_logprobs()
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    second = sampler_logprobs()
    now = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    assert second == pytest.approx(now, abs=1e-4) and second != pytest.approx(first, abs=1e-3)


def test_sampler_weights_and_compute_logprobs_agree_with_forward(service, training):
    tokenizer = training.get_tokenizer()
    path = training.save_weights_for_sampler("for-sampling").result().path
    assert "/sampler_weights/for-sampling" in path
    sampler = service.create_sampling_client(model_path=path).result()
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )
    forward = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    assert logprobs[0] is None
    assert logprobs[1:] == pytest.approx(forward, abs=1e-4)
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    a = sampler.sample(types.ModelInput.from_ints(ids), 1, greedy).result().sequences[0]
    b = sampler.sample(types.ModelInput.from_ints(ids), 1, greedy).result().sequences[0]
    assert a.tokens == b.tokens and len(a.tokens) == len(a.logprobs) > 0


def test_sampling_options(service):
    sampler = service.create_sampling_client(base_model="builtin-tiny").result()
    prompt = types.ModelInput.from_ints([72, 101, 108, 108, 111])
    out = sampler.sample(
        prompt, 3, types.SamplingParams(max_tokens=4, temperature=1.0, top_k=5, seed=3), include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
    ).result()
    assert len(out.sequences) == 3 and all(s.stop_reason == "length" and len(s.tokens) == 4 for s in out.sequences)
    assert out.prompt_logprobs[0] is None and all(v < 0 for v in out.prompt_logprobs[1:])
    assert out.topk_prompt_logprobs[0] is None and all(len(row) == 2 for row in out.topk_prompt_logprobs[1:])
    # A stop token ends the sequence and is returned as its last token.
    first = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result().sequences[0]
    stop = first.tokens[-1]
    stopped = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0, stop=[stop])
    ).result().sequences[0]
    assert stopped.tokens == first.tokens[: first.tokens.index(stop) + 1] and stopped.stop_reason == "stop"


def test_forward_backward_custom(training):
    data = [sft_datum(training.get_tokenizer(), c) for c in CONVERSATIONS[:2]]

    def mean_logprob_loss(batch, logprobs_list):
        loss = -sum(lp.sum() for lp in logprobs_list) / sum(lp.numel() for lp in logprobs_list)
        return loss, {"custom:mean": float(loss)}

    result = training.forward_backward_custom(data, mean_logprob_loss).result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert math.isfinite(result.metrics["loss:sum"]) and "custom:mean" in result.metrics


def test_one_engine_under_both_apis(server, service, training):
    # An adapter made with the seed API samples through the SDK ...
    created = requests.post(f"{server.url}/add_lora", json={"rank": 4, "alpha": 8.0}).json()
    done = requests.post(f"{server.url}/retrieve_future", json={"request_id": created["request_id"], "timeout": 30})
    adapter_id = done.json()["result"]["model_id"]
    sampler = service.create_sampling_client(base_model=adapter_id).result()
    params = types.SamplingParams(max_tokens=3, stop=[], seed=0)  # stop=[]: exactly max_tokens
    out = sampler.sample(types.ModelInput.from_ints([72, 105]), 1, params).result()
    assert len(out.sequences[0].tokens) == 3
    # ... and a model made through the SDK trains through the seed API.
    model_id = training.get_info().model_id
    chat = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    queued = requests.post(f"{server.url}/fwdbwd", json={"model_id": model_id, "data": chat}).json()
    result = requests.post(f"{server.url}/retrieve_future", json={"request_id": queued["request_id"], "timeout": 30})
    assert result.json()["status"] == "completed" and result.json()["result"]["loss"] > 0
    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()  # keeps the SDK's seq order usable


def test_bad_requests_fail_their_future_with_a_user_error(training):
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.RequestFailedError, match="advantages"):
        training.forward_backward([datum], "importance_sampling").result()
    with pytest.raises(tinker.RequestFailedError, match="not supported"):
        training.forward_backward([datum], "custom").result()
    # The failed requests took their turns: the next one runs normally.
    assert "loss:sum" in training.forward([datum], "cross_entropy").result().metrics


def test_malformed_protobuf_bodies_are_user_errors(server, training):
    from tinker.proto import tinker_public_pb2 as pb

    url, model_id = f"{server.url}/api/v1", training.get_info().model_id
    headers = {"Content-Type": "application/x-protobuf"}
    garbage = requests.post(f"{url}/forward_backward", data=b"\xff\xff\xff", headers=headers)
    assert garbage.status_code == 400
    empty = pb.ForwardBackwardRequest(model_id=model_id, loss_fn="cross_entropy").SerializeToString()
    queued = requests.post(f"{url}/forward_backward", data=empty, headers=headers).json()
    answer = requests.post(f"{url}/retrieve_future", json={"request_id": queued["request_id"]}).json()
    assert answer["category"] == "user" and "at least one example" in answer["error"]


@pytest.mark.slow
def test_chunked_forward_backward_equals_one_request(start_server, training, monkeypatch_module):
    """With at most 2 examples per request the SDK splits 5 datums into 3 requests and POSTs
    them concurrently, the first one last; the server runs them in seq_id order and the
    summed result equals one unsplit request's."""
    small = start_server(MAX_EXAMPLES_PER_REQUEST="2")
    service = tinker.ServiceClient(base_url=small.url, api_key="tml-test-key")
    chunked = service.create_lora_training_client(base_model="builtin-tiny", rank=8, seed=1).result()
    reference = service.create_lora_training_client(base_model="builtin-tiny", rank=8, seed=1).result()
    tokenizer = chunked.get_tokenizer()
    data = [sft_datum(tokenizer, CONVERSATIONS[i % 3]) for i in range(5)]
    result = chunked.forward_backward(data, "cross_entropy").result()
    parts = [reference.forward_backward(data[i : i + 2], "cross_entropy").result() for i in (0, 2, 4)]
    assert result.metrics["loss:sum"] == pytest.approx(sum(p.metrics["loss:sum"] for p in parts), rel=1e-5)
    flat = [x for p in parts for o in p.loss_fn_outputs for x in o["logprobs"].data]
    assert [x for o in result.loss_fn_outputs for x in o["logprobs"].data] == pytest.approx(flat, abs=1e-5)
    # The accumulated gradients are the same too: one step leaves both adapters equal.
    clients = (chunked, reference)
    for client in clients:
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [c.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data for c in clients]
    assert after[0] == pytest.approx(after[1], abs=1e-5)
    service.close("success").result()


def test_retrieve_future_answers_try_again_while_pending(server):
    """A long-poll that ends before the result exists says try_again (the SDK polls again)."""
    body = {
        "base_model": "builtin-tiny",  # the stateless form: no sampling session
        "num_samples": 8,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    queued = requests.post(f"{server.url}/api/v1/asample", json=body).json()
    assert len(queued["sample_sequence_ids"]) == 8
    poll = requests.post(
        f"{server.url}/api/v1/retrieve_future",
        json={"request_id": queued["request_id"]},
        headers={"x-stainless-read-timeout": "5"},  # leaves no time to wait: answer at once
    ).json()
    assert poll == {"type": "try_again", "request_id": queued["request_id"], "queue_state": "active"}
    unknown = requests.post(f"{server.url}/api/v1/retrieve_future", json={"request_id": "nope"})
    assert unknown.status_code == 404


def test_old_snapshots_are_released_with_a_clear_error(service):
    trainer = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=2).result()
    samplers = [trainer.save_weights_and_get_sampling_client().result() for _ in range(9)]
    prompt, params = types.ModelInput.from_ints([72, 105]), types.SamplingParams(max_tokens=2)
    assert len(samplers[-1].sample(prompt, 1, params).result().sequences) == 1
    with pytest.raises(tinker.BadRequestError, match="newer snapshots replaced"):
        samplers[0].sample(prompt, 1, params).result()


def test_lora_switches_choose_the_layers(server, service):
    trainer = service.create_lora_training_client(
        base_model="builtin-tiny", rank=4, train_attn=False, train_unembed=False
    ).result()
    model_id = trainer.get_info().model_id
    adapters = {a["model_id"]: a for a in requests.get(f"{server.url}/adapters").json()["adapters"]}
    assert adapters[model_id]["target_modules"] == ["down_proj", "gate_proj", "up_proj"]


def test_a_resent_sample_is_the_same_request(server):
    api = f"{server.url}/api/v1"
    session = requests.post(f"{api}/create_session", json={"tags": []}).json()["session_id"]
    sampler = requests.post(
        f"{api}/create_sampling_session",
        json={"session_id": session, "sampling_session_seq_id": 0, "base_model": "builtin-tiny"},
    ).json()["sampling_session_id"]
    body = {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 3},
    }
    first, again = (requests.post(f"{api}/asample", json=body).json() for _ in range(2))
    assert first == again and len(first["sample_sequence_ids"]) == 2
    body["seq_id"] = 1
    assert requests.post(f"{api}/asample", json=body).json()["request_id"] != first["request_id"]
