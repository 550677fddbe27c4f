"""Multi-adapter LoRA routing: mixed batches, gradient isolation, thread isolation."""

from __future__ import annotations

import threading

import pytest
import torch

from backend import FwdBwdRequest
from backend.lora.layer import Routing, use_adapters

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi Alice!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, a longer answer here."},
    ],
]


def _make_adapter(backend, rank: int, alpha: float, seed: int, targets=None) -> str:
    adapter_id = backend.add_lora(rank, alpha, targets, seed)["model_id"]
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # B starts at zero; make it non-zero so the adapter matters
        for p in backend.adapters.get(adapter_id).params[1::2]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return adapter_id


def _grads(backend, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in backend.adapters.get(adapter_id).params]


def _zero(backend, *adapter_ids: str) -> None:
    for adapter_id in adapter_ids:
        backend.adapters.get(adapter_id).optimizer.zero_grad(set_to_none=True)


def test_routing_gives_each_row_its_adapters_slot():
    routing = Routing.build(["a", "a", None, "b", "a"])
    assert routing.adapters == ("a", "b") and not routing.uniform
    assert routing.slots_B.tolist() == [1, 1, 0, 2, 1]
    assert Routing.build(["a", "a"]).uniform and Routing.build([None]).uniform


def test_new_adapter_leaves_the_base_model_unchanged(backend):
    adapter_id = backend.add_lora(8, 16, None, 1)["model_id"]
    tokens = torch.tensor([backend.render_prompts(["Hello there"])[0]])
    with torch.no_grad():
        base = backend.model(input_ids=tokens).logits
        with use_adapters([adapter_id]):
            adapted = backend.model(input_ids=tokens).logits
    torch.testing.assert_close(adapted, base, rtol=0, atol=0)


def test_fused_batch_of_different_ranks_matches_each_adapter_alone(backend):
    specs = [(4, 8.0), (8, 16.0), (16, 4.0)]
    ids = [_make_adapter(backend, rank, alpha, seed=10 + i) for i, (rank, alpha) in enumerate(specs)]
    bystander = _make_adapter(backend, 8, 16.0, seed=99)
    examples = backend.render_conversations(CONVERSATIONS)
    requests = [
        FwdBwdRequest(ids[0], examples[:2]),
        FwdBwdRequest(ids[1], examples[2:]),
        FwdBwdRequest(ids[2], examples),
    ]

    _zero(backend, *ids, bystander)
    fused = backend.forward_backward(requests)
    fused_grads = {a: _grads(backend, a) for a in ids}
    assert all(g is None for g in _grads(backend, bystander)), "an adapter with no rows got gradients"

    for request, fused_result in zip(requests, fused, strict=True):
        _zero(backend, *ids)
        alone = backend.forward_backward([request])[0]
        assert alone["loss"] == pytest.approx(fused_result["loss"], abs=1e-5)
        assert alone["num_tokens"] == fused_result["num_tokens"]
        for g_alone, g_fused in zip(_grads(backend, request.adapter_id), fused_grads[request.adapter_id], strict=True):
            torch.testing.assert_close(g_fused, g_alone, rtol=0, atol=1e-5)
    _zero(backend, *ids)


def test_rows_for_the_base_model_get_no_adapter(backend):
    adapter_id = _make_adapter(backend, 8, 16.0, seed=5)
    tokens = torch.tensor(backend.render_prompts(["abc", "xyz"]))  # same length: no padding
    with torch.no_grad():
        base = backend.model(input_ids=tokens).logits
        with use_adapters([None, adapter_id]):
            mixed = backend.model(input_ids=tokens).logits
        with use_adapters([adapter_id, adapter_id]):
            adapted = backend.model(input_ids=tokens).logits
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-5)
    assert not torch.allclose(adapted[1], base[1], atol=1e-4)


def test_adapter_targeting_some_modules_only(backend):
    adapter_id = _make_adapter(backend, 4, 8.0, seed=7, targets=["q_proj", "v_proj"])
    adapter = backend.adapters.get(adapter_id)
    assert adapter.layer_names and all(n.endswith(("q_proj", "v_proj")) for n in adapter.layer_names)
    result = backend.forward_backward([FwdBwdRequest(adapter_id, backend.render_conversations(CONVERSATIONS[:1]))])
    assert result[0]["loss"] > 0
    assert all(p.grad is not None for p in adapter.params)
    _zero(backend, adapter_id)


def test_concurrent_forwards_on_threads_never_see_each_others_adapter(backend):
    ids = [_make_adapter(backend, 8, 16.0, seed=20 + i) for i in range(3)]
    tokens = torch.tensor([backend.render_prompts(["The same prompt for everyone"])[0]])
    with torch.no_grad():
        expected = {}
        for adapter_id in ids:
            with use_adapters([adapter_id]):
                expected[adapter_id] = backend.model(input_ids=tokens).logits
    mismatches: list[str] = []

    def run(adapter_id: str) -> None:
        for _ in range(15):
            with torch.no_grad(), use_adapters([adapter_id]):
                logits = backend.model(input_ids=tokens).logits
            if not torch.allclose(logits, expected[adapter_id], atol=1e-5):
                mismatches.append(adapter_id)

    threads = [threading.Thread(target=run, args=(a,)) for a in ids for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches


def test_interleaved_rows_of_different_ranks_match_each_row_alone(backend):
    ids = [_make_adapter(backend, rank, alpha, seed=60 + rank) for rank, alpha in ((2, 4.0), (8, 32.0), (32, 8.0))]
    order = [ids[0], ids[1], None, ids[2], ids[0], ids[2]]
    tokens = torch.tensor(backend.render_prompts(["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff"]))  # equal lengths
    with torch.no_grad(), use_adapters(order):
        fused = backend.model(input_ids=tokens).logits
    for b, adapter_id in enumerate(order):
        with torch.no_grad(), use_adapters([adapter_id]):
            alone = backend.model(input_ids=tokens[b : b + 1]).logits
        torch.testing.assert_close(fused[b : b + 1], alone, rtol=0, atol=1e-5)


def test_cached_routing_weights_match_uncached(backend):
    """With a weight cache (as the decode loop uses), repeated forwards give the uncached
    result, including when the rows list the adapters exactly in slot order."""
    x, y = (_make_adapter(backend, rank, 8.0, seed=80 + rank) for rank in (4, 8))
    order = tuple(sorted((x, y)))
    tokens = torch.tensor(backend.render_prompts(["abcd", "wxyz"]))
    with torch.no_grad(), use_adapters(list(order)):
        expected = backend.model(input_ids=tokens).logits
    with torch.no_grad(), use_adapters(list(reversed(order))):
        expected_reversed = backend.model(input_ids=tokens).logits
    cache: dict = {}
    for rows, want in [(order, expected), (order[::-1], expected_reversed), (order, expected)]:
        routing = Routing.build(list(rows), "cpu", order, cache)  # one cache, as rows come and go
        with torch.no_grad(), use_adapters(routing):
            torch.testing.assert_close(backend.model(input_ids=tokens).logits, want, rtol=0, atol=1e-6)
