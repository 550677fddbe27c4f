"""Packed fused passes: every request's loss, gradient and logprobs are what the padded
pass and the request alone give, on builtin-tiny and on several architecture families;
models that cannot pack (hybrid recurrent layers) fall back to padding."""

from __future__ import annotations

import pytest
import torch

from backend import HFBackend, load_base_model
from backend.lora.routing import Routing
from backend.model.tiny_families import ensure_family_model
from backend.train import fused_pass as fused_module
from backend.train import varlen
from backend.train.examples import Example
from backend.train.fused_pass import FwdBwdRequest
from backend.train.packing import pack, pack_one_row, packed_positions, packing_mode
from thinker.core.config import Config

pytestmark = pytest.mark.unit

LENGTHS = (3, 70, 9, 41)  # very different lengths: packing skips most of the padding


def _example(length: int, vocab: int, seed: int, top_k: int = 0) -> Example:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (length,), generator=g)
    if top_k:
        targets = torch.randint(1, vocab, (length, top_k), generator=g)
        return Example(tokens, {"target_tokens": targets, "weights": torch.rand(length, top_k, generator=g)})
    weights = (torch.arange(length) >= length // 2).float()  # loss on the second half only
    return Example(tokens, {"target_tokens": torch.randint(1, vocab, (length,), generator=g), "weights": weights})


def _requests(backend: HFBackend, vocab: int) -> list[FwdBwdRequest]:
    a = backend.add_lora(4, 16.0, None, 11)["model_id"]
    b = backend.add_lora(8, 16.0, None, 12)["model_id"]
    for adapter_id in (a, b):  # nonzero B, so the adapters change the logits
        for p in backend.adapters.get(adapter_id).params:
            torch.nn.init.normal_(p, std=0.05)
    rl = [_example(n, vocab, 50 + n) for n in (33, 5)]
    rl = [Example(ex.input_tokens, {"target_tokens": ex.target_tokens, "logprobs": -torch.rand(ex.length),
                                    "advantages": torch.randn(ex.length)}) for ex in rl]  # fmt: skip
    return [
        FwdBwdRequest(a, [_example(n, vocab, n) for n in LENGTHS], return_logprobs=True),
        FwdBwdRequest(None, [_example(17, vocab, 7)], backward=False, return_logprobs=True),  # the base model
        FwdBwdRequest(b, [_example(60, vocab, 8), _example(2, vocab, 9)], reduction="sum"),
        FwdBwdRequest(a, [_example(12, vocab, 10, top_k=3)], backward=False),  # forward only, top-K
        FwdBwdRequest(b, rl, loss_fn="importance_sampling", reduction="sum"),
        FwdBwdRequest(b, [_example(25, vocab, 13, top_k=2)]),  # top-K targets, trained
    ]


def _run(backend: HFBackend, requests: list[FwdBwdRequest]) -> tuple[list[dict], dict[str, list[torch.Tensor]]]:
    """Results, and each trained adapter's gradients from this pass alone."""
    ids = {q.adapter_id for q in requests if q.adapter_id}
    for adapter_id in ids:
        for p in backend.adapters.get(adapter_id).params:
            p.grad = None
    results = backend._fused_pass(requests)
    grads = {i: [p.grad.clone() if p.grad is not None else None for p in backend.adapters.get(i).params] for i in ids}
    return results, grads


def _check_same(results, grads, expected_results, expected_grads, tol: float = 1e-5) -> None:
    for got, want in zip(results, expected_results, strict=True):
        assert isinstance(got, dict), got
        assert got["loss"] == pytest.approx(want["loss"], rel=tol, abs=tol)
        for lp, lp_want in zip(got.get("logprobs", []), want.get("logprobs", []), strict=True):
            torch.testing.assert_close(lp, lp_want, rtol=tol, atol=tol)
    for adapter_id, want in expected_grads.items():
        for g, g_want in zip(grads[adapter_id], want, strict=True):
            assert (g is None) == (g_want is None)
            if g is not None:
                torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)


def _packed_padded_alone(backend: HFBackend, monkeypatch, tol: float = 1e-5) -> None:
    vocab = int(backend.model.get_input_embeddings().weight.shape[0])
    requests = _requests(backend, vocab)
    packed = _run(backend, requests)
    with monkeypatch.context() as m:
        m.setattr(fused_module, "packing_mode", lambda model: None)
        padded = _run(backend, requests)
    _check_same(*packed, *padded, tol=tol)
    # Each request alone (its own pass, its gradient on its own adapter).
    for r, request in enumerate(requests):
        alone_results, alone_grads = _run(backend, [request])
        _check_same([packed[0][r]], {}, alone_results, {}, tol=tol)
        if request.backward and request.adapter_id and all(q.adapter_id != request.adapter_id or q is request
                                                           for q in requests if q.backward):  # fmt: skip
            _check_same([], packed[1], [], alone_grads, tol=tol)


def _tokens_seen(backend: HFBackend, requests: list[FwdBwdRequest]) -> list[tuple[int, ...]]:
    """The input shapes the model's embedding saw during one fused pass."""
    shapes: list[tuple[int, ...]] = []
    hook = backend.model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        backend._fused_pass(requests)
    finally:
        hook.remove()
    return shapes


def test_packed_pass_equals_padded_and_alone(backend, monkeypatch):
    assert packing_mode(backend.model) == "varlen"  # builtin-tiny runs sdpa
    _packed_padded_alone(backend, monkeypatch)


def test_rows_layout_equals_padded_and_alone(backend, monkeypatch):
    """The layout for attention implementations that cannot split by sequence (a mask)."""
    monkeypatch.setattr(fused_module, "packing_mode", lambda model: "rows")
    _packed_padded_alone(backend, monkeypatch)


def test_the_pass_computes_no_padding(backend, monkeypatch):
    vocab = int(backend.model.get_input_embeddings().weight.shape[0])
    requests = _requests(backend, vocab)
    lengths = [ex.length for q in requests for ex in q.examples]
    # varlen: 11 sequences of 2..70 tokens in one row of exactly their 277 tokens.
    assert _tokens_seen(backend, requests) == [(1, sum(lengths))]
    # rows: they fit in 4 rows of 70, not 11 rows.
    monkeypatch.setattr(fused_module, "packing_mode", lambda model: "rows")
    assert _tokens_seen(backend, requests) == [(4, max(lengths))]


def test_varlen_attention_is_cut_per_sequence(backend):
    """Each attention layer runs once per sequence on that sequence's own tokens (no mask
    over the whole row), and outside a packed pass it is plain sdpa."""
    import torch.nn.functional as F

    assert packing_mode(backend.model) == "varlen"
    seen: list[tuple[int, bool]] = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[2], attn_mask is None))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    inputs_1N = torch.randint(1, 100, (1, 12))
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", spy)
        with varlen.sequences(varlen.PackedSequences.of([5, 7])):
            backend.model(input_ids=inputs_1N, position_ids=packed_positions([5, 7], "cpu"), use_cache=False)
        layers = len(seen) // 2
        assert layers > 0 and seen == [(5, True), (7, True)] * layers
        seen.clear()
        backend.model(input_ids=inputs_1N, use_cache=False)  # no packed pass: one call per layer
        assert seen == [(12, True)] * layers


def test_pack_one_row_keeps_order_and_restarts_positions():
    layout = pack_one_row([3, 1, 2], "cpu")
    assert layout.width == 6 and layout.bins == [[0, 1, 2]]
    assert layout.positions_PL.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert layout.flat_N.tolist() == list(range(6))
    assert layout.spans == [(0, 3), (1, 1), (2, 2)]
    assert layout.sequences.bounds == ((0, 3), (3, 4), (4, 6)) and layout.sequences.total == 6


def test_band_mask_matches_transformers_sliding_window():
    # q attends to kv in (q - window, q]: a window of 2 sees itself and one before.
    assert varlen._band_mask(4, 2, "cpu")[0, 0].int().tolist() == [
        [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]  # fmt: skip


def test_pack_fills_rows_as_long_as_the_longest_sequence():
    layout = pack([3, 10, 6, 4, 7], "cpu")
    # First fit, longest first: 10 | 7 then 3 | 6 then 4; in original order within a row.
    assert layout.width == 10 and layout.bins == [[1], [0, 4], [2, 3]]
    assert layout.flat_N.tolist()[:3] == [10, 11, 12]  # sequence 0 opens row 1
    assert layout.positions_PL[1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert layout.spans == [(1, 10), (0, 3), (4, 7), (2, 6), (3, 4)]


def test_routing_from_lengths_gives_each_sequence_its_tokens():
    routing = Routing.from_lengths([("a", 3), (None, 2), ("b", 4), ("a", 1), ("b", 2)])
    segments = routing.segments(12)
    assert segments["a"].index_S.tolist() == [0, 1, 2, 9]
    assert not segments["a"].contiguous
    assert segments["b"].index_S.tolist() == [5, 6, 7, 8, 10, 11]
    contiguous = Routing.from_lengths([("a", 3), ("a", 2), ("b", 4), (None, 1)]).segments(10)
    assert (contiguous["a"].start, contiguous["a"].end, contiguous["a"].contiguous) == (0, 5, True)
    assert (contiguous["b"].start, contiguous["b"].end) == (5, 9)
    with pytest.raises(RuntimeError):
        routing.segments(6)  # another token count: the packed layout covers only its own


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("packing-families")


FAMILY_MODES = [("llama", "varlen"), ("qwen3", "varlen"), ("gemma2", "rows"),  # Gemma2 runs eager attention
                ("mistral", "varlen"), ("gpt2", "varlen"), ("qwen3.5", None)]  # fmt: skip


@pytest.mark.parametrize(("family", "mode"), FAMILY_MODES)
def test_families_pack_or_fall_back(family, mode, family_root, tmp_path, monkeypatch):
    folder = ensure_family_model(family, family_root / "models")
    config = Config(base_model=str(folder), thinker_cache_dir=str(family_root / "cache"), device="cpu")
    backend = HFBackend(load_base_model(config), tmp_path)
    assert packing_mode(backend.model) == mode
    vocab = int(backend.model.get_input_embeddings().weight.shape[0])
    shapes = _tokens_seen(backend, _requests(backend, vocab))
    rows = sum(len(q.examples) for q in _requests(backend, vocab))
    assert (len(shapes) == 1 and shapes[0][0] < rows) is (mode is not None)  # fewer, packed rows, or padded rows
    _packed_padded_alone(backend, monkeypatch)
