"""backend/model/random_models.py: real architectures with random weights, built offline."""

from __future__ import annotations

import json

import pytest

from backend.model.random_models import ARCHITECTURES, ensure_random_model

pytestmark = pytest.mark.unit


def test_llama_1b_has_the_shapes_of_a_1b_model():
    from transformers import LlamaConfig

    config = LlamaConfig(**ARCHITECTURES["llama-1b"])
    H, F, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * H * H + 2 * H * kv + 3 * H * F + 2 * H  # attention, MLP, two norms
    params = V * H + L * per_layer + H  # tied head: the embedding once
    assert 1.1e9 < params < 1.3e9


def test_a_cut_down_copy_keeps_the_width_and_has_its_own_folder(tmp_path):
    full_width = ARCHITECTURES["smollm2-135m"]["hidden_size"]
    folder = ensure_random_model("smollm2-135m", tmp_path, layers=1)
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (1, full_width)
    assert folder.name == "random-smollm2-135m-1layers-seed0"
    assert ensure_random_model("smollm2-135m", tmp_path, layers=1) == folder  # written once
