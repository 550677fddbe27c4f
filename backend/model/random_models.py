"""Real architectures with random weights, built from their configs (no download).

For benchmarks: SmolLM2-135M's exact shapes cost what the real model costs, and the
folder loads through the same ``from_pretrained`` path as anything else. The tokenizer
is builtin-tiny's byte-level one (its ids are a subset of the model's vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from backend.model.builtin_tiny import build_tokenizer, write_model_once

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json, the fields that shape compute.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# meta-llama/Llama-3.2-1B's shapes (1.24B parameters, the embedding tied to the head).
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ARCHITECTURES = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}


def ensure_random_model(arch: str, cache_dir: str | os.PathLike, seed: int = 0, layers: int | None = None) -> Path:
    """Write a randomly initialised ``arch`` model (+ tokenizer) once; return its folder.
    ``layers``: keep only that many decoder layers (the width of ``arch`` at a fraction of
    its cost, e.g. for memory measurements)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(ARCHITECTURES[arch])
    if layers is not None:
        shape["num_hidden_layers"] = layers

    def build():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**shape)), build_tokenizer()

    suffix = "" if layers is None else f"-{layers}layers"
    return write_model_once(Path(cache_dir) / f"random-{arch}{suffix}-seed{seed}", build)
