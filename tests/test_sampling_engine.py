"""The shared decode loop: requests joining mid-flight get exactly their solo tokens."""

from __future__ import annotations

import threading

import pytest

from backend import SamplingParams
from backend.sample.decode import generate
from backend.sample.engine import gather_until
from backend.sample.sampling import SampleRow
from tests.conftest import engine_for, train_adapters
from thinker.core.errors import BadRequestError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def adapters(backend) -> list[str]:
    answers = ["Hi Alice!", "Hello there, Bob", "Carol"]
    return train_adapters(backend, answers, ranks=[4, 8, 16], alpha=16.0, seed=70, steps=60)


@pytest.fixture
def engine(backend):
    engine = engine_for(backend, max_rows=64,
        window_s=0.01,
    )
    yield engine
    engine.close()


def _alone(backend, row: SampleRow):
    return generate(
        backend.model, backend.tokenizer, [row], backend.eos_ids, backend.loaded.context_length, backend.device
    )[0]


def test_fused_greedy_sampling_equals_each_request_alone(backend, adapters):
    """Requests sent while a decode is running join that batch (they do not wait for it to
    drain), and every row still gets exactly the tokens it gets alone."""
    first_step, go_on = threading.Event(), threading.Event()
    steps: list[tuple[int, list[int]]] = []  # per step: rows already decoding, ids of the rows admitted

    def run(fn, admitted):
        steps.append((len(engine._batch), [id(row) for request in admitted for row in request.rows]))
        fn(admitted)
        if len(steps) == 1:  # hold the loop after its first step until the others are queued
            first_step.set()
            assert go_on.wait(60)

    engine = engine_for(backend, max_rows=64, window_s=0.01, run=run,
    )
    try:
        prompts = backend.render_prompts(["Hello!", "Tell me something longer, please", "x"])
        rows = [
            SampleRow(adapter, prompt, SamplingParams(max_tokens=6 + 5 * i, temperature=0))
            for i, adapter in enumerate([*adapters, None])
            for prompt in prompts
        ]
        futures = [engine.submit([row]) for row in rows[:6]]
        assert first_step.wait(60)
        decoding = len(engine._batch)
        futures += [engine.submit(rows[6:9]), engine.submit(rows[9:])]
        go_on.set()
        results = [c for f in futures for c in f.result(timeout=60)]
    finally:
        go_on.set()
        engine.close()
    assert decoding > 0, "every first row ended at its first step: nothing was left to join"
    late = {id(row) for row in rows[6:]}
    joined = [before for before, admitted in steps if late & set(admitted)]
    assert joined and all(before > 0 for before in joined), steps  # admitted into a batch still decoding
    assert late <= {i for _, admitted in steps for i in admitted}
    for row, result in zip(rows, results, strict=True):
        alone = _alone(backend, row)
        assert result.tokens == alone.tokens and result.text == alone.text
        assert len(result.tokens) <= row.params.max_tokens


def test_each_row_keeps_its_own_parameters(backend, adapters, engine):
    prompt = backend.render_prompts(["Hello!"])[0]
    stop_row = SampleRow(adapters[1], prompt, SamplingParams(max_tokens=30, temperature=0, stop=(",",)))
    short_row = SampleRow(adapters[1], prompt, SamplingParams(max_tokens=2, temperature=0))
    seeded = SampleRow(adapters[0], prompt, SamplingParams(max_tokens=8, temperature=1.0, top_k=5, seed=11))
    stop, short, sampled = (
        f.result(timeout=60)[0] for f in [engine.submit([r]) for r in (stop_row, short_row, seeded)]
    )
    assert (stop.text, stop.stop_reason) == ("Hello there", "stop")
    assert len(short.tokens) == 2 and short.stop_reason == "length"
    again = engine.submit([seeded]).result(timeout=60)[0]
    assert sampled.tokens == again.tokens  # the seed, not the batch company, decides


def test_bad_prompt_is_refused_at_submission(backend, engine):
    with pytest.raises(BadRequestError, match="context window"):
        engine.submit([SampleRow(None, [5] * backend.loaded.context_length, SamplingParams())])


def test_rows_joining_later_see_the_adapters_current_weights(backend, adapters):
    """An adapter whose rows left, was trained, and came back must not be decoded with
    the weights it had before (the stacked-weight cache is rebuilt when rows change)."""
    import torch

    from backend.sample.decode import DecodeBatch

    a, b = adapters[0], adapters[1]
    prompt = backend.render_prompts(["Hello!"])[0]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
    ctx = backend.loaded.context_length
    batch.admit(
        [
            batch.make_row(SampleRow(a, prompt, SamplingParams(max_tokens=1, temperature=0)), ctx),
            batch.make_row(SampleRow(b, prompt, SamplingParams(max_tokens=40, temperature=0)), ctx),
        ]
    )
    batch.step()  # a's row is done; b's goes on
    adapter = backend.adapters.get(a)
    saved = [p.detach().clone() for p in adapter.params]
    try:
        with torch.no_grad():
            for p in adapter.params[1::2]:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
        late = [batch.make_row(SampleRow(a, prompt, greedy), ctx), batch.make_row(SampleRow(b, prompt, greedy), ctx)]
        batch.admit(late)
        while len(batch):
            batch.step()
        assert late[0].completion.tokens == _alone(backend, SampleRow(a, prompt, greedy)).tokens
    finally:
        with torch.no_grad():
            for p, value in zip(adapter.params, saved, strict=True):
                p.copy_(value)


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(backend, engine, monkeypatch):
    from backend.sample.decode import DecodeBatch

    prompt = backend.render_prompts(["Hello!"])[0]
    row = SampleRow(None, prompt, SamplingParams(max_tokens=4, temperature=0))
    real_step = DecodeBatch.step
    calls = {"n": 0}

    def flaky_step(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out of memory")
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", flaky_step)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        engine.submit([row]).result(timeout=30)
    assert len(engine.submit([row]).result(timeout=30)[0].tokens) == 4


@pytest.mark.parametrize(
    ("first", "last", "until"),
    [
        (0.0, 0.0, 0.005),  # a lone request waits one window
        (0.0, 0.004, 0.009),  # each arrival within a window extends the wait by a window
        (0.0, 0.097, 0.1),  # but never past 20 windows after the first
        (0.0, 0.5, 0.1),
    ],
)
def test_an_idle_loop_waits_for_requests_that_keep_arriving(first, last, until):
    assert gather_until(first, last, 0.005) == pytest.approx(until)


def test_requests_sent_together_start_as_one_group(backend, adapters):
    """Requests submitted one after another while the loop waits for company are admitted in
    one loop iteration: one prefill group, decoding in step."""
    admitted: list[int] = []

    def run(fn, requests):
        admitted.append(len(requests))
        return fn(requests)

    engine = engine_for(backend, window_s=1.0, run=run)
    try:
        prompt = backend.render_prompts(["Hello!"])[0]
        params = SamplingParams(max_tokens=3, temperature=0, stop_at_eos=False)
        futures = [engine.submit([SampleRow(a, prompt, params)]) for a in (*adapters, None) for _ in range(3)]
        for future in futures:
            future.result(timeout=120)
    finally:
        engine.close()
    assert admitted[0] == len(futures)
