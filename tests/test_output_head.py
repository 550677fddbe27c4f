"""The chunked output-head log-probabilities equal the plain computation."""

from __future__ import annotations

import pytest
import torch

import backend.train.output_head as output_head

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("chunk_floats", [37, 10**9])  # many small chunks, and one
def test_head_logprobs_and_gradient_match_full_logits(monkeypatch, chunk_floats):
    monkeypatch.setattr(output_head, "_HEAD_CHUNK_FLOATS", chunk_floats)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (13,), generator=gen)
    upstream = torch.randn(13, generator=gen, dtype=torch.float64)

    expected = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    got = output_head.head_target_logprobs(hidden, weight, targets)
    (got_grad,) = torch.autograd.grad((got * upstream.float()).sum(), hidden)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-6)

