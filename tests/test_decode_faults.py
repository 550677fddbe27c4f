"""Failures in the shared decode loop fail only the request that caused them, and frozen
sampler snapshots hold their weights and nothing more.

Failures are injected inside the model (in its last decoder layer, after the earlier
layers have already grown the KV cache), for the batches that hold a chosen row: that
row is the culprit. The other rows must finish with exactly the tokens they get without
the culprit (greedy), and the culprit's request must fail with a reason naming its size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from backend import FwdBwdRequest, SamplingParams
from backend.sample.decode import generate
from backend.sample.engine import SamplingEngine
from backend.sample.sampling import SampleRow
from tests.conftest import engine_for, train_adapters
from thinker.core.errors import RequestFailedError

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=16, temperature=0, stop_at_eos=False)  # every row runs its full length


@pytest.fixture(scope="module")
def adapter_ids(backend) -> list[str]:
    return train_adapters(backend, ["Hi Alice!", "Hello there, Bob"], ranks=[4, 4], alpha=8.0, seed=90, steps=20)


@pytest.fixture
def engine(backend):
    engine = engine_for(backend, window_s=0
    )
    yield engine
    engine.close()


@contextmanager
def failing_when(backend, fails: Callable[[torch.Tensor, torch.Tensor], bool], error: Exception) -> Iterator[dict]:
    """Make the model raise ``error`` in its last decoder layer for every forward whose
    ``fails(input_ids_BL, attention_mask_BL)`` is true. Yields counters of what it saw."""
    inner = backend.model.model  # the decoder stack: both of decode.py's forward paths go through it
    last = inner.layers[-1]
    seen = {"failed": 0, "passes": 0, "doomed": False}

    def forward(*args, **kwargs):
        ids_BL = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen["doomed"] = fails(ids_BL, kwargs["attention_mask"])
        seen["passes"] += 1
        return type(inner).forward(inner, *args, **kwargs)

    def last_layer(*args, **kwargs):
        if seen["doomed"]:
            seen["failed"] += 1
            raise error
        return type(last).forward(last, *args, **kwargs)

    inner.forward, last.forward = forward, last_layer
    try:
        yield seen
    finally:
        del inner.forward, last.forward


def context_over(limit: int) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """A batch fails when one of its rows holds more than ``limit`` real tokens of context:
    that row's cache has outgrown the memory left for it."""
    return lambda ids_BL, mask_BL: int(mask_BL.sum(-1).max()) > limit


def alone(backend, row: SampleRow) -> list[int]:
    ctx, device = backend.loaded.context_length, backend.device
    return generate(backend.model, backend.tokenizer, [row], backend.eos_ids, ctx, device)[0].tokens


def submit_together(engine: SamplingEngine, requests: list[list[SampleRow]]):
    """Queue every request before the loop can take any: they are admitted as one batch."""
    with engine._cond:  # the loop takes pending requests under this lock
        return [engine.submit(rows) for rows in requests]


def bystanders(backend, adapter_ids) -> list[list[SampleRow]]:
    short = backend.render_prompts(["Hello!", "Hi"])
    return [
        [SampleRow(adapter_ids[0], short[0], GREEDY), SampleRow(adapter_ids[0], short[1], GREEDY)],
        [SampleRow(adapter_ids[1], short[0], GREEDY)],
        [SampleRow(None, short[1], GREEDY)],
    ]


def culprit(backend, adapter_id: str, samples: int = 1) -> tuple[list[SampleRow], int]:
    """A request whose prompt is longer than any bystander's context will ever be; it
    fails once it has generated 3 tokens. Returns its rows and the context limit."""
    prompt = backend.render_prompts(["Please tell me a long story about a dragon and a knight " * 2])[0]
    return [SampleRow(adapter_id, prompt, GREEDY)] * samples, len(prompt) + 3


@pytest.mark.parametrize(
    "error, reason",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory running"),
        (RuntimeError("a kernel failed on this row"), "a kernel failed on this row"),
    ],
    ids=["out-of-memory", "other-error"],
)
def test_a_decode_step_failing_for_one_row_fails_only_its_request(backend, adapter_ids, engine, error, reason):
    others = bystanders(backend, adapter_ids)
    expected = [[alone(backend, row) for row in rows] for rows in others]
    bad, limit = culprit(backend, adapter_ids[1], samples=2)
    assert max(len(row.prompt_tokens) + GREEDY.max_tokens for rows in others for row in rows) <= limit

    with failing_when(backend, context_over(limit), error) as seen:
        futures = submit_together(engine, [others[0], bad, *others[1:]])
        with pytest.raises(type(error) if reason != "out of memory running" else RequestFailedError) as failed:
            futures[1].result(timeout=120)
        results = [f.result(timeout=120) for f in futures[:1] + futures[2:]]
    assert seen["failed"] > 0  # the failure did happen, mid-decode
    assert reason in str(failed.value)
    if isinstance(error, torch.OutOfMemoryError):
        # The reason names the failed sample's size, in terms its sender controls.
        prompt = len(bad[0].prompt_tokens)
        assert f"one of 2 samples, at {limit + 1} tokens of context ({prompt} prompt + 4 generated" in str(failed.value)
    for completions, tokens in zip(results, expected, strict=True):
        assert [c.tokens for c in completions] == tokens

    # The loop goes on: a request sent afterwards runs normally.
    row = others[1][0]
    assert engine.submit([row]).result(timeout=60)[0].tokens == expected[1][0]


def test_a_batch_too_big_as_a_whole_is_split_and_every_row_finishes(backend, adapter_ids, engine):
    """When only the whole batch does not fit (no row is too big alone), nobody fails."""
    requests = bystanders(backend, adapter_ids)
    expected = [[alone(backend, row) for row in rows] for rows in requests]
    too_many = lambda ids_BL, mask_BL: ids_BL.shape[0] > 1 and ids_BL.shape[1] == 1  # noqa: E731 - decode steps of 2+ rows
    with failing_when(backend, too_many, torch.OutOfMemoryError("out of memory")) as seen:
        results = [f.result(timeout=120) for f in submit_together(engine, requests)]
    assert seen["failed"] > 0
    for completions, tokens in zip(results, expected, strict=True):
        assert [c.tokens for c in completions] == tokens


def test_the_other_rows_of_a_failed_request_stop_decoding(backend, adapter_ids, engine):
    """A request is failed as soon as one of its samples fails; its other samples leave
    the batch instead of decoding on for an answer nobody will get."""
    bad, limit = culprit(backend, adapter_ids[0])
    short = backend.render_prompts(["Hi"])[0]
    long_row = SampleRow(None, short, SamplingParams(max_tokens=200, temperature=0, stop_at_eos=False))
    with failing_when(backend, context_over(limit), torch.OutOfMemoryError("out of memory")) as seen:
        future = engine.submit([*bad, long_row])
        with pytest.raises(RequestFailedError, match="out of memory running a decode step of one of 2 samples"):
            future.result(timeout=120)
        deadline = time.monotonic() + 120
        while engine.stats()["sampling_rows"] and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the batch to empty, not ordering events
    assert engine.stats()["sampling_rows"] == 0
    # 200 more steps of the long row would show here; dropped, it costs at most a step or two.
    assert seen["passes"] < 30


def test_a_prefill_failing_for_one_request_fails_only_that_request(backend, adapter_ids, engine):
    others = bystanders(backend, adapter_ids)
    expected = [[alone(backend, row) for row in rows] for rows in others]
    bad, _ = culprit(backend, adapter_ids[0])
    longest_other = max(len(row.prompt_tokens) for rows in others for row in rows)

    def prefill_of_long_prompt(ids_BL, mask_BL) -> bool:
        """A prefill chunk (several columns; the prompt may come in chunks) holding the long prompt."""
        return ids_BL.shape[1] > 1 and int(mask_BL.sum(-1).max()) > longest_other

    with failing_when(backend, prefill_of_long_prompt, torch.OutOfMemoryError("out of memory")):
        futures = submit_together(engine, [others[0], bad, *others[1:]])
        with pytest.raises(RequestFailedError, match="out of memory running the prefill of 1 prompts"):
            futures[1].result(timeout=120)
        results = [f.result(timeout=120) for f in futures[:1] + futures[2:]]
    for completions, tokens in zip(results, expected, strict=True):
        assert [c.tokens for c in completions] == tokens


# ---- frozen snapshots ---------------------------------------------------------------------


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_bytes(adapter) -> int:
    """Memory an adapter keeps alive: its weights, their gradients, its optimizer's moments."""
    grads = [p.grad for p in adapter.params if p.grad is not None]
    moments = []
    if adapter.optimizer is not None:
        moments = [v for state in adapter.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _bytes(adapter.params) + _bytes(grads) + _bytes(moments)


def assert_frozen(adapter) -> None:
    assert adapter.optimizer is None
    for p in adapter.params:
        assert not p.requires_grad and p.grad is None and p.grad_fn is None
    assert held_bytes(adapter) == _bytes(adapter.params)


def test_a_sampler_snapshot_holds_detached_weights_and_no_optimizer(backend, adapter_ids, tmp_path):
    source = backend.adapters.get(adapter_ids[0])
    backend.snapshot(source.id, "decode-faults-snapshot")
    backend.save_state(source.id, tmp_path / "sampler", False)
    backend.create_from_checkpoint(tmp_path / "sampler", "decode-faults-checkpoint", optimizer=False, trainable=False)
    try:
        for frozen_id in ("decode-faults-snapshot", "decode-faults-checkpoint"):
            frozen = backend.adapters.get(frozen_id)
            assert_frozen(frozen)
            for mine, theirs in zip(frozen.params, source.params, strict=True):
                assert torch.equal(mine, theirs)

        # Fused with another adapter's training pass, a forward on the snapshot gets no gradient.
        examples = backend.render_conversations(
            [[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi"}]]
        )
        outcomes = backend.forward_backward(
            [
                FwdBwdRequest("decode-faults-snapshot", examples, backward=False),
                FwdBwdRequest(adapter_ids[1], examples),
            ]
        )
        assert all(isinstance(o, dict) for o in outcomes)
        assert_frozen(backend.adapters.get("decode-faults-snapshot"))
        backend.adapters.get(adapter_ids[1]).optimizer.zero_grad(set_to_none=True)

        # It samples like its source, and its checkpoint with optimizer state loads as a trainable copy.
        row = SampleRow("decode-faults-snapshot", backend.render_prompts(["Hello!"])[0], GREEDY)
        assert alone(backend, row) == alone(backend, SampleRow(source.id, row.prompt_tokens, GREEDY))
        backend.save_state("decode-faults-snapshot", tmp_path / "full", True)
        copy = backend.create_from_checkpoint(tmp_path / "full", None, optimizer=True, trainable=True)
        trainable = backend.adapters.get(copy["model_id"])
        assert trainable.optimizer is not None and all(p.requires_grad for p in trainable.params)
        backend.remove_adapter(copy["model_id"])
    finally:
        backend.remove_adapter("decode-faults-snapshot")
        backend.remove_adapter("decode-faults-checkpoint")
