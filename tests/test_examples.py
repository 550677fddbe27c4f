"""Chat rendering into tokens + loss weights."""

from __future__ import annotations

import pytest

from backend.train.examples import Example
from thinker.core.errors import BadRequestError

pytestmark = pytest.mark.unit


def _weighted_text(backend, example: Example) -> str:
    pairs = zip(example.target_tokens.tolist(), example.weights.tolist(), strict=True)
    return backend.tokenizer.decode([t for t, w in pairs if w])


def test_only_assistant_turns_carry_loss(backend):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi Alice!"},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Hi again."},
    ]
    example = backend.render_conversations([conv])[0]
    assert _weighted_text(backend, example) == "Hi Alice!<|im_end|>Hi again.<|im_end|>"
    # the model reads the whole rendered conversation, shifted by one
    full = backend.tokenizer.apply_chat_template(conv, tokenize=False)
    assert backend.tokenizer.decode(example.input_tokens.tolist() + example.target_tokens[-1:].tolist()) == full


def test_unicode_content_is_located_exactly(backend):
    conv = [{"role": "user", "content": "Grüße 👋"}, {"role": "assistant", "content": "Ça va ✓"}]
    assert _weighted_text(backend, backend.render_conversations([conv])[0]) == "Ça va ✓<|im_end|>"


def test_conversation_without_assistant_turn_is_rejected(backend):
    with pytest.raises(BadRequestError, match=r"data\[1\].*no assistant turn"):
        backend.render_conversations(
            [
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                [{"role": "user", "content": "only a question"}],
            ]
        )


def test_example_lengths_must_agree():
    with pytest.raises(BadRequestError, match="weights: shape"):
        Example([1, 2], {"target_tokens": [2, 3], "weights": [1.0]})
    with pytest.raises(BadRequestError, match="target_tokens: shape"):
        Example([1, 2], {"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})


def test_prompt_rendering_ends_with_the_generation_prompt(backend):
    tokens = backend.render_prompts(["Hello!"])[0]
    assert backend.tokenizer.decode(tokens) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
