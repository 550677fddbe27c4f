"""Adapters on disk in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files load with ``peft.PeftModel.from_pretrained(base_model, folder)`` onto the same
base model and give the logits the server gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from backend.lora.adapters import Adapter
from backend.lora.layer import MultiLoraLinear

_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")  # fullmatch


def save_peft_adapter(adapter: Adapter, layers: dict[str, MultiLoraLinear], base_model_path: str, folder: Path) -> Path:
    """Write ``adapter`` into ``folder`` (created if needed) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in adapter.layer_names:
        layer = layers[name]
        # PEFT's saved keys drop the adapter name: base_model.model.<path>.lora_A.weight
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[adapter.id].detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[adapter.id].detach().cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=list(adapter.target_modules),
        lora_dropout=0.0,
        bias="none",
        # GPT-2's Conv1D stores its weight (in, out); PEFT needs to be told (A/B keep its layout).
        fan_in_fan_out=any(layers[name].fan_in_fan_out for name in adapter.layer_names),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    ).save_pretrained(str(folder))
    return folder


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config (adapter_config.json) and tensors keyed by module
    path and matrix: {"model.layers.0.self_attn.q_proj": {"A": ..., "B": ...}}."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r} in {folder}")
        tensors.setdefault(match["module"], {})[match["matrix"]] = value
    return config, tensors


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
