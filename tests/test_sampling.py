"""Batched sampling: greedy agreement with single rows, seeds, stop strings, limits."""

from __future__ import annotations

import pytest
import torch

from backend import AdamParams, FwdBwdRequest, SamplingParams
from backend.sample.decode import generate
from backend.sample.sampling import SampleRow
from thinker.core.errors import BadRequestError

pytestmark = pytest.mark.unit


def _generate(backend, rows):
    return generate(
        backend.model, backend.tokenizer, rows, backend.eos_ids, backend.loaded.context_length, backend.device
    )


@pytest.fixture(scope="module")
def trained(backend) -> list[str]:
    ids = []
    for i, answer in enumerate(["Hi Alice!", "Bonjour, Bob"]):
        adapter_id = backend.add_lora(8, 16.0, None, 40 + i)["model_id"]
        conv = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": answer}]
        examples = backend.render_conversations([conv])
        for _ in range(60):
            backend.forward_backward([FwdBwdRequest(adapter_id, examples)])
            backend.optim_step(adapter_id, AdamParams(learning_rate=5e-3))
        ids.append(adapter_id)
    return ids


def test_batched_greedy_equals_each_row_alone(backend, trained):
    prompts = backend.render_prompts(["Hello!", "A much longer prompt that forces left padding", "Hi"])
    greedy = SamplingParams(max_tokens=12, temperature=0)
    rows = [SampleRow(a, p, greedy) for a in (*trained, None) for p in prompts]
    together = _generate(backend, rows)
    for row, result in zip(rows, together, strict=True):
        alone = _generate(backend, [row])[0]
        assert result.tokens == alone.tokens
    assert together[0].text == "Hi Alice!" and together[0].stop_reason == "stop"
    assert together[3].text == "Bonjour, Bob"


def test_seeded_sampling_is_reproducible_and_seed_dependent(backend, trained):
    prompt = backend.render_prompts(["Hello!"])[0]

    def run(seed):
        params = SamplingParams(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        return _generate(backend, [SampleRow(trained[0], prompt, params)])[0].tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_is_greedy(backend, trained):
    prompt = backend.render_prompts(["Hello!"])[0]
    top1 = _generate(
        backend, [SampleRow(trained[1], prompt, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3))]
    )
    greedy = _generate(backend, [SampleRow(trained[1], prompt, SamplingParams(max_tokens=10, temperature=0))])
    assert top1[0].tokens == greedy[0].tokens


def test_stop_strings_cut_the_text(backend, trained):
    prompt = backend.render_prompts(["Hello!"])[0]
    result = _generate(
        backend, [SampleRow(trained[1], prompt, SamplingParams(max_tokens=40, temperature=0, stop=(",",)))]
    )[0]
    assert result.text == "Bonjour"
    assert result.stop_reason == "stop"


def test_max_tokens_and_context_limits(backend):
    prompt = backend.render_prompts(["Hello!"])[0]
    result = _generate(backend, [SampleRow(None, prompt, SamplingParams(max_tokens=5, temperature=0))])[0]
    assert len(result.tokens) == 5 and result.stop_reason == "length"
    too_long = [1] * backend.loaded.context_length
    with pytest.raises(BadRequestError, match="context window"):
        _generate(backend, [SampleRow(None, too_long, SamplingParams())])


def test_sample_seeds_differ_per_prompt(backend, trained):
    prompts = backend.render_prompts(["Hello!", "Hello!"])
    out = backend.sample(trained[0], prompts, SamplingParams(max_tokens=12, temperature=2.0, seed=5))
    again = backend.sample(trained[0], prompts, SamplingParams(max_tokens=12, temperature=2.0, seed=5))
    assert out["outputs"] == again["outputs"]
    assert out["outputs"][0] != out["outputs"][1]
    assert torch.is_grad_enabled()
