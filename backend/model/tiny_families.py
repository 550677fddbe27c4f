"""Tiny random models of every architecture family thinker supports (hidden 64, 2 layers).

Built offline from each family's config class (no download), written in Hugging Face
format with builtin-tiny's byte-level tokenizer and chat template, so a folder loads
through ``load_base_model`` exactly as a hub model would. tests/test_families.py runs the
whole LoRA life cycle on each; docs/model-families.md says what each covers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from backend.model.builtin_tiny import build_tokenizer, write_model_once

VERSION = "v3"  # bump when a recipe changes so old cache folders are not reused

_COMMON = {  # the fields most families share (Llama's names)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# family -> (model_type, config fields over _COMMON; None: the family has its own names)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 8}),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", {}),
    "granite": ("granite", {}),
    "phi3": ("phi3", {}),
    "phi": ("phi", {}),
    "gpt-neox": ("gpt_neox", {}),
    "falcon": ("falcon", {}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "qwen2-moe": (
        "qwen2_moe",
        {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1},
    ),
    "qwen3-moe": ("qwen3_moe", {**_MOE, "num_experts": 4, "head_dim": 16, "decoder_sparse_step": 1}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt-oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 8}),
    "deepseek-v3": (
        "deepseek_v3",
        {
            **_MOE,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_key_value_heads": 4,  # MLA expands its latent to every head (as the real config has)
            "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "qwen3.5": (
        "qwen3_5_text",
        {
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],  # hybrid: one of each
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
    ),
}


def build_config(family: str, vocab_size: int):
    from transformers import AutoConfig

    model_type, fields = FAMILIES[family]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**_COMMON, **fields})


def ensure_family_model(family: str, cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``family``'s tiny random model (+ tokenizer) under ``cache_dir`` once; return its folder."""
    from transformers import AutoModelForCausalLM

    def build():
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_config(family, len(tokenizer)))
        return model, tokenizer

    return write_model_once(Path(cache_dir) / f"family-{family}-{VERSION}-seed{seed}", build)
