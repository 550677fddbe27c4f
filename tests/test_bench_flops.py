"""bench/flops.py: the FLOPs that MFU divides by, checked against torch's own FLOP counter."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from torch.utils.flop_counter import FlopCounterMode

from backend import FwdBwdRequest
from backend.train.examples import Example
from bench.flops import ModelShape, Row, rows_of, training_flops

pytestmark = pytest.mark.unit


def counted_flops(backend, requests) -> float:
    """Matmul FLOPs torch counts in one forward+backward; attention kernels left out (on CPU
    the fused SDPA kernel has no FLOP formula, so its count would depend on the kernel)."""

    def run():
        with FlopCounterMode(display=False) as counter:
            outcome = backend.forward_backward(requests)
        assert not any(isinstance(o, BaseException) for o in outcome), outcome
        return counter.get_flop_counts()["Global"]

    counts = backend.compute.run(run)
    return float(sum(v for op, v in counts.items() if "attention" not in str(op)))


def request(adapter_id: str, length: int, loss_from: int) -> FwdBwdRequest:
    rng = random.Random(0)
    tokens = [rng.randrange(3, 200) for _ in range(length + 1)]
    weights = [0.0] * loss_from + [1.0] * (length + 1 - loss_from)
    return FwdBwdRequest(adapter_id, [Example.from_sequence(tokens, weights)])


@pytest.fixture
def adapter(backend):
    adapter_id = backend.add_lora(8, 16.0, None, 0)["model_id"]
    yield adapter_id
    backend.remove_adapter(adapter_id)


def test_the_count_matches_torch_flop_counter(backend):
    """A forward of the base model alone is half the training count without LoRA (forward
    2 FLOPs per weight, backward 2 more), head at loss positions only: exactly what torch
    counts (attention aside). LoRA layers are left out: how their products are split into
    kernels is the layer's business, and their count is plain arithmetic (below)."""
    forward = replace(request(None, 48, 24), backward=False)
    no_attention = replace(ModelShape.of(backend.model), layers=0)
    rows = rows_of(backend, [forward])
    assert rows == [Row(tokens=48, loss_tokens=25, lora_params=0)]
    assert training_flops(no_attention, rows) == 2 * counted_flops(backend, [forward])


def test_only_loss_positions_go_through_the_head(backend, adapter):
    """Moving 20 positions into the loss adds exactly 4 V H FLOPs each, as counted by torch."""
    half, more = [request(adapter, 48, 28)], [request(adapter, 48, 8)]
    shape = ModelShape.of(backend.model)
    assert rows_of(backend, more)[0].loss_tokens - rows_of(backend, half)[0].loss_tokens == 20
    predicted = training_flops(shape, rows_of(backend, more)) - training_flops(shape, rows_of(backend, half))
    assert predicted == 20 * 4 * shape.head_params
    assert counted_flops(backend, more) - counted_flops(backend, half) == pytest.approx(predicted, rel=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_is_counted_once_and_the_embedding_never(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    shape = ModelShape.of(model)
    layers = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    assert shape.base_linear_params == layers
    assert shape.head_params == 300 * 32
    assert (shape.layers, shape.attention_dim) == (2, 32)


def test_attention_is_counted_over_the_causal_pairs():
    shape = ModelShape(base_linear_params=0, layers=3, attention_dim=64, head_params=0)
    row = Row(tokens=100, loss_tokens=0, lora_params=0)
    # forward Q K^T and P V: 2 x 2 FLOPs x d per pair; backward twice the forward
    assert training_flops(shape, [row]) == 3 * 12 * 64 * (100 * 101 / 2)
    assert training_flops(shape, [row], causal=False) == 3 * 12 * 64 * 100 * 100
    assert training_flops(shape, [replace(row, tokens=200)]) > 3.9 * training_flops(shape, [row])  # quadratic


def test_lora_costs_three_times_its_forward():
    shape = ModelShape(base_linear_params=1000, layers=0, attention_dim=0, head_params=0)
    plain = training_flops(shape, [Row(10, 0, 0)])
    assert plain == 4 * 1000 * 10  # forward + gradient to the activations, no weight gradient
    assert training_flops(shape, [Row(10, 0, 50)]) - plain == 6 * 50 * 10
