"""The decode loop's parts: exact greedy tokens and logprobs against a cache-free reference,
chunked prefill interleaved with decode steps, slot reuse without moving other rows,
streaming, batched top-k/top-p and incremental stop strings."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from backend import SamplingParams
from backend.lora.routing import use_adapters
from backend.sample.choose import RowParams, _top_p_threshold, choose
from backend.sample.decode import DecodeBatch
from backend.sample.sampling import SampleRow
from backend.sample.stops import StopMatcher
from tests.conftest import engine_for, train_adapters

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False)


@pytest.fixture(scope="module")
def adapters(backend) -> list[str]:
    return train_adapters(backend, ["Hi Alice!", "Hello there, Bob"], ranks=[4, 8], alpha=16.0, seed=300, steps=20)


@torch.no_grad()
def reference(backend, row: SampleRow) -> tuple[list[int], list[float]]:
    """Greedy decoding with no cache at all: the whole sequence through the model every step."""
    tokens, logprobs = list(row.prompt_tokens), []
    with use_adapters([row.adapter_id], backend.device):
        for _ in range(row.params.max_tokens):
            logits_V = backend.model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            token = int(logits_V.argmax())
            logprobs.append(float(torch.log_softmax(logits_V, -1)[token]))
            tokens.append(token)
    return tokens[len(row.prompt_tokens) :], logprobs


def rows_of(backend, adapters) -> list[SampleRow]:
    prompts = backend.render_prompts(["Hello!", "A much longer prompt that forces some padding, surely", "Hi"])
    return [SampleRow(a, p, GREEDY) for a in (*adapters, None) for p in prompts]


def test_engine_greedy_tokens_and_logprobs_equal_a_cache_free_reference(backend, adapters):
    """Rows joining at different times, prefilled in small chunks between decode steps, in
    slots that others left: every token and logprob as without any cache (1e-5)."""
    rows = rows_of(backend, adapters)
    engine = engine_for(backend, window_s=0,
        prefill_tokens=16,
    )
    try:
        futures = [engine.submit(rows[:4])]
        futures += [engine.submit([row]) for row in rows[4:]]
        results = [c for f in futures for c in f.result(timeout=120)]
    finally:
        engine.close()
    for row, result in zip(rows, results, strict=True):
        tokens, logprobs = reference(backend, row)
        assert result.tokens == tokens
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-5)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(backend, adapters):
    short = SampleRow(adapters[0], backend.render_prompts(["Hi"])[0], GREEDY)
    long_prompt = backend.render_prompts(["Tell me a long story about dragons and knights. " * 4])[0]
    long = SampleRow(adapters[1], long_prompt, GREEDY)
    ctx = backend.loaded.context_length
    batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device, prefill_tokens=32)
    first, second = batch.make_row(short, ctx), batch.make_row(long, ctx)
    batch.admit([first])
    batch.enqueue([second])
    decoded_while_prefilling = 0
    while batch.prefilling:
        before = len(first.completion.tokens)
        batch.prefill_step()
        batch.step()
        decoded_while_prefilling += bool(batch.prefilling) and len(first.completion.tokens) > before
    assert decoded_while_prefilling >= len(long_prompt) // 32 - 1  # a token for the short row per chunk
    while len(batch):
        batch.step()
    assert first.completion.tokens == reference(backend, short)[0]
    assert second.completion.tokens == reference(backend, long)[0]


def test_rows_join_and_leave_without_moving_the_others(backend, adapters):
    """A slot cache with room: a row joining writes only its own slot; a row leaving moves
    only the last row into its slot. Other rows' cached keys stay where they are, untouched."""
    prompts = backend.render_prompts(["Hello there!", "Hi", "Hey"])  # the last joins: no longer than the frontier
    ctx = backend.loaded.context_length
    batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
    short = SamplingParams(max_tokens=2, temperature=0, stop_at_eos=False)
    live = [
        batch.make_row(SampleRow(adapters[0], prompts[0], GREEDY), ctx),
        batch.make_row(SampleRow(adapters[1], prompts[1], short), ctx),
        batch.make_row(SampleRow(None, prompts[2], GREEDY), ctx),
    ]
    batch.admit(live[:2])
    batch.step()
    layer = batch.cache.layers[0]
    storage = layer.keys_SHCD.data_ptr()
    span = slice(batch.cache.window.first, batch.cache.window.frontier)
    row0 = layer.keys_SHCD[0, :, span].clone()
    batch.admit(live[2:])  # joins slot 2
    assert batch.cache.layers[0] is layer and layer.keys_SHCD.data_ptr() == storage
    assert torch.equal(layer.keys_SHCD[0, :, span], row0)
    batch.step()  # the short row (slot 1) finishes; the row of slot 2 moves into slot 1
    assert batch.rows == [live[0], live[2]]
    assert batch.cache.layers[0] is layer and layer.keys_SHCD.data_ptr() == storage
    assert torch.equal(layer.keys_SHCD[0, :, span], row0)
    while len(batch):
        batch.step()
    assert live[2].completion.tokens == reference(backend, live[2].row)[0]


def test_streamed_tokens_add_up_to_the_completion_and_come_before_it(backend, adapters):
    rows = rows_of(backend, adapters)[:3]
    seen: dict[int, list] = {i: [] for i in range(3)}
    completed_early = []
    engine = engine_for(backend, window_s=0
    )
    try:
        holder: dict = {}

        def on_tokens(i: int, tokens: list[int], logprobs: list[float]) -> None:
            assert threading.current_thread().name == "thinker-sampler"
            completed_early.append(holder["future"].done())
            seen[i].append((tokens, logprobs))

        holder["future"] = future = engine.submit(rows, on_tokens)
        results = future.result(timeout=60)
        # A callback that raises fails its own request only.
        boom = engine.submit(rows[:1], lambda i, t, lp: 1 / 0)
        fine = engine.submit(rows[:1])
        with pytest.raises(ZeroDivisionError):
            boom.result(timeout=60)
        assert fine.result(timeout=60)[0].tokens == results[0].tokens
    finally:
        engine.close()
    assert not any(completed_early)
    for i, result in enumerate(results):
        assert [t for tokens, _ in seen[i] for t in tokens] == result.tokens
        assert [lp for _, lps in seen[i] for lp in lps] == result.logprobs
        # A call per step: the first may carry two tokens (the prefill's and its first step's).
        assert all(tokens for tokens, _ in seen[i]) and len(seen[i]) >= len(result.tokens) - 1


def test_batched_top_k_and_top_p_keep_what_a_sort_keeps():
    torch.manual_seed(0)
    logits_BV = torch.randn(6, 500) * 3
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.999, 0.1, 0.75])
    threshold_B = _top_p_threshold(torch.softmax(logits_BV, -1), top_p)
    for b in range(6):
        probs_V = torch.softmax(logits_BV[b], -1)
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        drop_V = (torch.cumsum(sorted_V, -1) - sorted_V) >= top_p[b]
        kept_by_sort = set(order_V[~drop_V].tolist())
        assert set(torch.nonzero(probs_V > threshold_B[b]).flatten().tolist()) == kept_by_sort
    params = [SamplingParams(temperature=1.0, top_k=k, seed=1) for k in (1, 3, 0, 7, 2, 1)]
    row_params = RowParams.build(params, 500, torch.device("cpu"))
    for step in range(20):
        tokens, _ = choose(logits_BV, row_params, [(step * 0.37 + b * 0.11) % 1 for b in range(6)])
        for b, p in enumerate(params):
            if p.top_k:
                assert tokens[b] in set(torch.topk(logits_BV[b], p.top_k).indices.tolist())


def test_stop_strings_are_found_from_the_new_text_only(backend):
    tokenizer = backend.tokenizer
    tokens = tokenizer.encode("Well, the answer is: STOP here", add_special_tokens=False)
    matcher = StopMatcher(tokenizer, ["is: ST"])
    found = [matcher.feed(tokens[: n + 1]) for n in range(len(tokens))]
    first = found.index(True)
    assert "is: ST" in tokenizer.decode(tokens[: first + 1]) and "is: ST" not in tokenizer.decode(tokens[:first])
    decoded = []
    original = tokenizer.decode

    def counting(ids, **kwargs):
        decoded.append(len(ids))
        return original(ids, **kwargs)

    tokenizer.decode = counting
    try:
        long = tokenizer.encode("x" * 300, add_special_tokens=False)
        matcher = StopMatcher(tokenizer, ["never"])
        for n in range(len(long)):
            matcher.feed(long[: n + 1])
    finally:
        del tokenizer.decode
    assert max(decoded) <= 4  # each step decodes the newest tokens, not the whole output
    assert matcher.text == original(long)


@pytest.mark.parametrize("family", ["qwen3.5", "mistral", "gpt2"])
def test_other_families_prefilled_in_chunks_decode_exactly(family, tmp_path_factory):
    """A hybrid model (recurrent states carried from chunk to chunk), a sliding-window one
    and one with learned positions: chunked prefill and slot decoding, rows joining late,
    give the cache-free reference's greedy tokens and logprobs."""
    from backend import HFBackend, load_base_model
    from backend.model.tiny_families import ensure_family_model
    from thinker.core.config import Config

    root = tmp_path_factory.mktemp(f"chunked-{family}")
    folder = ensure_family_model(family, root / "models")
    config = Config(base_model=str(folder), thinker_cache_dir=str(root / "cache"), device="cpu")
    model_backend = HFBackend(load_base_model(config), root / "data")
    prompts = model_backend.render_prompts(["Hi", "Say something longer than the others, please.", "Two plus two?"])
    rows = [SampleRow(None, p, SamplingParams(max_tokens=6, temperature=0, stop_at_eos=False)) for p in prompts]
    engine = engine_for(model_backend, window_s=0,
        prefill_tokens=8,
    )
    try:
        futures = [engine.submit([row]) for row in rows]
        twice = engine.submit([rows[1], rows[1]])  # one prompt sampled twice: prefilled once
        results = [f.result(timeout=120)[0] for f in futures] + twice.result(timeout=120)
    finally:
        engine.close()
        model_backend.close()
    for row, result in zip([*rows, rows[1], rows[1]], results, strict=True):
        tokens, logprobs = reference(model_backend, row)
        assert result.tokens == tokens
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-5)


def test_samples_of_one_prompt_are_prefilled_once_and_draw_their_own_tokens(backend, adapters):
    """Four samples of one prompt on each of two adapters, and a third prompt: the prefill
    forward runs the 3 distinct (adapter, prompt) pairs, not 9 rows; every row still gets
    what it gets decoded alone with its own seed (tokens, and logprobs to 1e-5)."""
    ctx = backend.loaded.context_length
    prompt, other = backend.render_prompts(["Once upon a time", "Hi"])
    params = SamplingParams(max_tokens=8, temperature=1.0, stop_at_eos=False)
    rows = [SampleRow(a, prompt, replace(params, seed=10 + i)) for a in adapters for i in range(4)]
    rows.append(SampleRow(adapters[0], other, replace(params, seed=99)))
    prefill_rows = []
    embed = backend.model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _out: prefill_rows.append(args[0].shape))
    try:
        batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
        live = [batch.make_row(row, ctx) for row in rows]
        batch.admit(live)
    finally:
        hook.remove()
    assert [shape[0] for shape in prefill_rows] == [3]  # one forward, of the distinct prompts
    while len(batch):
        batch.step()
    firsts = {tuple(lv.completion.tokens[:3]) for lv in live[:4]}
    assert len(firsts) > 1  # the samples of one prompt drew different tokens
    for row, got in zip(rows, live, strict=True):
        alone = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
        single = alone.make_row(row, ctx)
        alone.admit([single])
        while len(alone):
            alone.step()
        assert got.completion.tokens == single.completion.tokens
        torch.testing.assert_close(
            torch.tensor(got.completion.logprobs), torch.tensor(single.completion.logprobs), rtol=0, atol=1e-5
        )


def test_a_group_joins_with_each_adapters_rows_side_by_side(backend, adapters):
    """Requests sent in adapter order a, b, None, a, b, None join as a, a, b, b, None, None:
    every layer's LoRA reads one contiguous run of rows per adapter."""
    ctx = backend.loaded.context_length
    prompts = backend.render_prompts(["Hello!", "Hi"])
    order = [*adapters, None] * 2
    batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
    live = [batch.make_row(SampleRow(a, prompts[i // 3], GREEDY), ctx) for i, a in enumerate(order)]
    batch.admit(live)
    assert [r.row.adapter_id for r in batch.rows] == [adapters[0]] * 2 + [adapters[1]] * 2 + [None] * 2
    while len(batch):
        batch.step()
    for row in live:
        assert row.completion.tokens == reference(backend, row.row)[0]
