"""The OpenAI-compatible API (/oai/api/v1) through the official ``openai`` client: the base
model, an adapter and a sampler checkpoint saved while training goes on; streaming (and its
stop-string holdback); logprobs that agree with the Tinker API's; errors in OpenAI's shape."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import tinker
from tinker import types

from backend import HFBackend, load_base_model
from backend.sample.engine import SamplingEngine
from backend.sample.sampling import SampleRow, SamplingParams
from client_example import TinkerClient
from thinker.core.config import Config
from thinker.http.oai.streaming import Holdback

ALICE, BOB = "tml-alice-key-0001", "tml-bob-key-00002"
ANSWER = "Paris is lovely."
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server(THINKER_API_KEYS=f"{ALICE},{BOB}", MAX_WORKERS="4")


def oai(server, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/oai/api/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def adapter(keyed_server) -> str:
    """Alice's adapter (seed API), trained to answer "Hello!" with ANSWER."""
    with TinkerClient(keyed_server.url, api_key=ALICE) as client:
        model_id = client.create_lora(rank=8, seed=3)
        for _ in range(40):
            client.train_step(model_id, [[*HELLO, {"role": "assistant", "content": ANSWER}]], learning_rate=5e-3)
    return model_id


@pytest.fixture(scope="module")
def service(keyed_server, monkeypatch_module):
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient(base_url=keyed_server.url, api_key=ALICE)
    yield client
    client.close("success").result()


def base_name(server) -> str:
    return oai(server).models.list().data[0].id


# ---- in process: the engine's token hook and the stream's holdback ----------------------


@pytest.mark.unit
def test_on_tokens_hears_every_token_before_the_future_completes(backend):
    engine = SamplingEngine(
        backend.model, backend.tokenizer, backend.eos_ids, backend.loaded.context_length, backend.device,
        window_s=0.0, run=backend.compute.run, hold=backend.residency.using,
    )
    heard: dict[int, list[int]] = {0: [], 1: []}
    events: list[str] = []

    def on_tokens(row: int, tokens: list[int], logprobs: list[float]) -> None:
        assert len(tokens) == len(logprobs) > 0
        heard[row] += tokens
        events.append(f"row {row}")

    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, stop_at_eos=False)
    rows = [SampleRow(None, [72, 105, 33], params), SampleRow(None, [10, 72], params)]
    try:
        future = engine.submit(rows, on_tokens=on_tokens)
        future.add_done_callback(lambda _f: events.append("done"))
        completions = future.result(timeout=120)
    finally:
        engine.close()
    assert [heard[0], heard[1]] == [c.tokens for c in completions]
    # A step at a time (the first call also has the prefill's token), all before the future completes.
    assert events[-1] == "done" and events.count("row 0") == events.count("row 1") == 5


@pytest.mark.unit
def test_holdback_never_shows_any_part_of_a_stop_string(backend):
    tokenizer = backend.tokenizer
    tokens = tokenizer("Hello world STOP and more", add_special_tokens=False)["input_ids"]
    stream = Holdback(tokenizer, ("STOP", "zzz"))
    shown = []
    for token in tokens:
        shown.append(stream.push([token]))
        assert "S" not in "".join(shown)  # not even the stop string's first letter
    shown.append(stream.finish("Hello world "))  # the final text, cut before the stop string
    assert "".join(shown) == "Hello world "


# ---- over HTTP --------------------------------------------------------------------------

@pytest.mark.e2e
def test_models_lists_the_base_model_and_only_the_callers_adapters(keyed_server, adapter):
    alice = [m.id for m in oai(keyed_server).models.list().data]
    bob = [m.id for m in oai(keyed_server, BOB).models.list().data]
    assert alice[0] == bob[0] == "builtin-tiny" and adapter in alice and adapter not in bob
    assert oai(keyed_server).models.retrieve(adapter).id == adapter
    with pytest.raises(openai.NotFoundError):
        oai(keyed_server, BOB).models.retrieve(adapter)


@pytest.mark.e2e
def test_chat_on_the_base_model_and_an_adapter(keyed_server, adapter):
    client = oai(keyed_server)
    base = client.chat.completions.create(model=base_name(keyed_server), messages=HELLO, max_tokens=24, temperature=0)
    tuned = client.chat.completions.create(model=adapter, messages=HELLO, max_tokens=24, temperature=0)
    assert tuned.object == "chat.completion" and tuned.model == adapter
    assert tuned.choices[0].message.role == "assistant"
    assert tuned.choices[0].message.content == ANSWER and tuned.choices[0].finish_reason == "stop"
    assert base.choices[0].message.content != ANSWER
    assert tuned.usage.prompt_tokens == len(chat_prompt(HELLO))
    assert tuned.usage.completion_tokens == len(keyed_server_tokenizer().encode(ANSWER, add_special_tokens=False))
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens


def keyed_server_tokenizer():
    from backend.model.builtin_tiny import build_tokenizer

    return build_tokenizer()


def chat_prompt(messages) -> list[int]:
    tokenizer = keyed_server_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.e2e
def test_n_seed_and_max_tokens(keyed_server):
    client = oai(keyed_server)
    args = {"model": "builtin-tiny", "prompt": ["Hello", "The quick"], "max_tokens": 5, "temperature": 1.0, "seed": 11}
    first, again = client.completions.create(n=2, **args), client.completions.create(n=2, **args)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the seed decides
    assert all(c.finish_reason == "length" for c in first.choices) and first.usage.completion_tokens == 20
    chat = client.chat.completions.create(model="builtin-tiny", messages=HELLO, max_completion_tokens=3, n=3, seed=1)
    assert len(chat.choices) == 3 and chat.usage.completion_tokens <= 9


@pytest.mark.e2e
def test_streaming_matches_the_answer_at_once(keyed_server, adapter):
    client = oai(keyed_server)
    whole = client.chat.completions.create(model=adapter, messages=HELLO, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(
        model=adapter, messages=HELLO, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # piece by piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.e2e
def test_streamed_text_never_shows_a_stop_string(keyed_server, adapter):
    client = oai(keyed_server)
    stream = client.chat.completions.create(
        model=adapter, messages=HELLO, max_tokens=24, temperature=0, stop=["lovely"], stream=True
    )
    pieces, finish = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish.append(chunk.choices[0].finish_reason)
        assert "l" not in "".join(pieces)[len("Paris is "):]  # not even its first letter
    assert "".join(pieces) == "Paris is " and finish[-1] == "stop"
    raw = requests.post(
        f"{keyed_server.url}/oai/api/v1/completions",
        headers={"Authorization": f"Bearer {ALICE}"},
        json={"model": "builtin-tiny", "prompt": "Hello", "max_tokens": 4, "stream": True},
        stream=True,
        timeout=120,
    )
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


@pytest.mark.e2e
def test_a_sampler_checkpoint_while_training_goes_on(keyed_server, service):
    training = service.create_lora_training_client(base_model="builtin-tiny", rank=8, seed=2).result()
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("Hi there, friend", add_special_tokens=False)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )
    for _ in range(3):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = training.save_weights_for_sampler("oai").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    expected = sampler.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=6, temperature=0))
    expected_tokens = expected.result().sequences[0].tokens
    # Training goes on; the checkpoint path keeps serving the weights it saved.
    training.forward_backward([datum], "cross_entropy").result()
    step = training.optim_step(types.AdamParams(learning_rate=5e-2))
    answer = oai(keyed_server).completions.create(model=path, prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    step.result()
    assert answer.model == path
    got = [t for t in expected_tokens if t != tokenizer.eos_token_id]
    assert answer.choices[0].text == tokenizer.decode(got, skip_special_tokens=True)
    # Its logprobs are the checkpoint's, as the Tinker API computes them.
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(ids + got)).result()
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx(scored[len(ids):], abs=1e-4)
    with pytest.raises(openai.NotFoundError) as refused:  # another user's checkpoint: as if it did not exist
        oai(keyed_server, BOB).completions.create(model=path, prompt="Hi", max_tokens=2)
    assert refused.value.body["code"] == "model_not_found"


@pytest.mark.e2e
def test_echo_with_max_tokens_0_scores_the_prompt(keyed_server, adapter, service):
    """What lm-eval's loglikelihood asks: the prompt's logprobs, None first, with top_logprobs."""
    tokenizer = keyed_server_tokenizer()
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    out = oai(keyed_server).completions.create(model=adapter, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    choice = out.choices[0]
    assert choice.text == "The quick brown fox" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert 3 <= len(top) <= 4 and value in top.values() and max(top.values()) >= value
    sampler = service.create_sampling_client(base_model=adapter)  # (Alice's adapter: her key)
    scored = sampler.result().compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert lp.token_logprobs[1:] == pytest.approx(scored[1:], abs=1e-4)
    # echo with generation: the prompt, then the completion and its logprobs.
    more = oai(keyed_server).completions.create(
        model=adapter, prompt=ids, max_tokens=2, echo=True, logprobs=1, temperature=0
    ).choices[0]
    assert more.text.startswith("The quick brown fox") and len(more.logprobs.tokens) == len(ids) + 2


@pytest.mark.e2e
def test_chat_logprobs_agree_with_a_scoring_pass(keyed_server, adapter):
    client = oai(keyed_server)
    chat = client.chat.completions.create(
        model=adapter, messages=HELLO, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ANSWER
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in content)
    prompt = chat_prompt(HELLO)
    answer = keyed_server_tokenizer().encode(ANSWER, add_special_tokens=False)
    scored = client.completions.create(model=adapter, prompt=prompt + answer, max_tokens=0, echo=True, logprobs=0)
    assert [t.logprob for t in content] == pytest.approx(scored.choices[0].logprobs.token_logprobs[len(prompt):],
                                                          abs=1e-3)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"n": 10**6}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(keyed_server, body, param):
    sent = {"model": "builtin-tiny", "messages": HELLO, **body}
    answer = requests.post(
        f"{keyed_server.url}/oai/api/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"}, json=sent,
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


@pytest.mark.e2e
def test_unknown_models_anothers_adapter_and_no_key(keyed_server, adapter):
    with pytest.raises(openai.NotFoundError) as unknown:
        oai(keyed_server).chat.completions.create(model="no-such-model", messages=HELLO)
    assert set(unknown.value.body) == {"message", "type", "param", "code"}
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as anothers:
        oai(keyed_server, BOB).chat.completions.create(model=adapter, messages=HELLO)
    assert anothers.value.body["message"] == unknown.value.body["message"].replace("no-such-model", adapter)
    with pytest.raises(openai.AuthenticationError) as no_key:
        oai(keyed_server, "tml-not-a-key-at-all").models.list()
    assert no_key.value.body["code"] == "invalid_api_key"  # OpenAI's shape before the route runs too


@pytest.mark.e2e
def test_open_server_needs_no_key(server):
    """Without keys configured, any key (or none) works, as on every other route."""
    answer = requests.post(
        f"{server.url}/oai/api/v1/completions", json={"model": "builtin-tiny", "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


def sampled_tokens(server) -> float:
    lines = requests.get(f"{server.url}/metrics", timeout=30).text.splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith("thinker_sampled_tokens_total")))


@pytest.mark.e2e
def test_requests_count_in_the_sampling_metrics(server):
    before = sampled_tokens(server)
    client = oai(server, "any-key-works-here")
    out = client.completions.create(model="builtin-tiny", prompt="Hello", max_tokens=5, n=2, temperature=1.0, seed=3)
    streamed = client.chat.completions.create(
        model="builtin-tiny", messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage for chunk in streamed if chunk.usage][0]
    assert sampled_tokens(server) - before == out.usage.completion_tokens + usage.completion_tokens


@pytest.fixture
def unbatched_app(cache_dir, tmp_path):
    """The app in process, BATCHING=false, on a backend of its own (create_app attaches the
    app's store to its backend: the shared ``backend`` fixture must not get this one's)."""
    from app import close_app, create_app

    config = Config(
        base_model="builtin-tiny", thinker_cache_dir=str(cache_dir), thinker_data_dir=str(tmp_path), device="cpu",
        batching=False, max_open_requests_per_user=1,
    )
    app = create_app(config, backend=HFBackend(load_base_model(config), tmp_path / "backend"))
    yield app
    close_app(app)


@pytest.mark.unit
def test_without_the_decode_loop_a_stream_still_arrives_whole(unbatched_app):
    """BATCHING=false: no shared decode loop, so no tokens as they are made; the stream's last
    chunk carries the whole text, the same as the answer at once."""
    client = unbatched_app.test_client()
    sent = {"model": "builtin-tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    whole = client.post("/oai/api/v1/completions", json=sent).get_json()
    streamed = client.post("/oai/api/v1/completions", json={**sent, "stream": True})
    events = [e.removeprefix("data: ") for e in streamed.get_data(as_text=True).split("\n\n") if e]
    assert streamed.mimetype == "text/event-stream" and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.unit
def test_a_stream_holds_its_open_request_slot_until_its_end(unbatched_app):
    """MAX_OPEN_REQUESTS_PER_USER (1 here) counts a stream as open until its last event (not
    only until its first byte), so streams cannot take every HTTP thread."""
    client = unbatched_app.test_client()
    sent = {"model": "builtin-tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    streaming = client.post("/oai/api/v1/completions", json=sent, buffered=False)
    assert client.get("/oai/api/v1/models").status_code == 429
    assert streaming.get_data(as_text=True).endswith("data: [DONE]\n\n")
    streaming.close()
    assert client.get("/oai/api/v1/models").status_code == 200


@pytest.mark.e2e
def test_a_streamed_completion_with_echo_and_logprobs_adds_up_to_the_answer_at_once(keyed_server, adapter):
    client = oai(keyed_server)
    args = {"model": adapter, "prompt": "The quick", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args)]
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].finish_reason == whole.finish_reason
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    assert sum((p.tokens for p in parts), []) == whole.logprobs.tokens
    assert sum((p.text_offset for p in parts), []) == whole.logprobs.text_offset
    values = sum((p.token_logprobs for p in parts), [])
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-4)


@pytest.mark.e2e
def test_a_live_adapters_requests_keep_their_place_behind_its_training(keyed_server):
    """A request on an adapter that trains runs after the training sent before it: here it
    scores with the weights of the step sent just before, not the ones before that step."""
    client = oai(keyed_server)
    with TinkerClient(keyed_server.url, api_key=ALICE) as seed:
        model_id = seed.create_lora(rank=4, seed=9)

        def score() -> list[float]:
            args = {"model": f"tinker://{model_id}", "prompt": "Paris is lovely.", "max_tokens": 0, "echo": True}
            return client.completions.create(logprobs=0, **args).choices[0].logprobs.token_logprobs[1:]

        before = score()
        seed.fwdbwd(model_id, [[*HELLO, {"role": "assistant", "content": ANSWER}]])
        step = seed.optim_step(model_id, learning_rate=5e-2)  # queued, not waited for
        right_behind = score()
        seed.wait_for_result(step)
        assert right_behind == pytest.approx(score(), abs=1e-6) and right_behind != pytest.approx(before, abs=1e-3)
