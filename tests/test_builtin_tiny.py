"""builtin-tiny: small, deterministic, and loaded through the normal from_pretrained path."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.model.builtin_tiny import ensure_builtin_tiny

pytestmark = pytest.mark.unit


def _digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_written_twice_gives_identical_weights(tmp_path):
    first = ensure_builtin_tiny(tmp_path / "a")
    second = ensure_builtin_tiny(tmp_path / "b")
    assert _digest(first) == _digest(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in first.iterdir()
    }


def test_is_a_tiny_llama_chat_model(tmp_path):
    folder = ensure_builtin_tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = "héllo ✓ \n\t"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
