"""builtin-tiny: a deterministic, tiny Llama-architecture chat model written by this project.

It exists so the server, the examples and the tests run with no network: the model is
generated from a fixed seed, written in Hugging Face format (config.json,
model.safetensors, tokenizer files with a chat template) into a cache folder, and then
loaded through the same ``from_pretrained`` path as any hub model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bump when the recipe changes so old cache folders are not reused.
VERSION = "v1"
SEED = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CONTEXT_LENGTH = 512

# ChatML, as SmolLM2 uses, without a default system prompt (keeps test sequences short).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes to)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer():
    """A byte-level tokenizer: 3 chat special tokens, then one token per byte (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_chars[b]] = len(SPECIAL_TOKENS) + b
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=CONTEXT_LENGTH,
    )


def build_model(vocab_size: int) -> torch.nn.Module:
    """109,056 parameters; weights drawn from a seeded generator in a fixed order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    # Overwrite transformers' own init so the weights depend only on this recipe and torch's
    # CPU generator, not on the init order of a given transformers release.
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                # Larger (tied) embeddings give logits enough range that a LoRA adapter can
                # make one answer clearly most likely within a few steps.
                std = 0.2 if "embed_tokens" in name else 0.05
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def write_model_once(target: Path, build) -> Path:
    """Have ``build()`` return a (model, tokenizer) pair and save both to ``target``, once.

    Written into a temporary folder and renamed into place, so concurrent servers never
    see a half-written model.
    """
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_builtin_tiny(cache_dir: str | os.PathLike) -> Path:
    """Write builtin-tiny under ``cache_dir`` once and return its folder."""

    def build():
        tokenizer = build_tokenizer()
        return build_model(len(tokenizer)), tokenizer

    return write_model_once(Path(cache_dir) / f"builtin-tiny-{VERSION}", build)
