"""Adapters on disk in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files load with ``peft.PeftModel.from_pretrained(base_model, folder)`` onto the same
base model and give the logits the server gives. ``target_modules`` lists the exact module
paths the adapter has weights in, not short names: peft matches a short name against every
module of that name, and in transformers 5 some of those are not the layers the server
wrapped (DeepSeek-V3's ``gate_proj`` also names parts of its fused experts), so a
short-name export would load and silently leave the trained MLP LoRA unapplied.

Weights that are no ``nn.Linear`` of peft's own go in ``target_parameters`` (peft's
``ParamWrapper``): the fused MoE expert weights (backend/lora/experts.py), and the linear
layers peft would move onto the experts when it loads an adapter naming them in
``target_modules`` (DeepSeek-V3's dense and shared MLP: see ``peft_remapped``), named by
their ``<path>.weight`` (a 2-D ParamWrapper is plain LoRA on that weight). For a 3-D
weight peft keeps one lora_A of (E*r, in), expert-major rows, and one lora_B of
(out, r*E) whose column k*E + e is expert e's rank-k column; several targeted weights of
one module nest, the first registered innermost, so the keys of all but the last carry a
``.base_layer`` per weight wrapped after it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from backend.lora.adapters import Adapter
from backend.lora.experts import EXPERT_WEIGHTS, ExpertLora
from backend.lora.layer import MultiLoraLinear, short_name

_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")  # fullmatch


def save_peft_adapter(adapter: Adapter, layers: dict[str, MultiLoraLinear], base_model_path: str, folder: Path) -> Path:
    """Write ``adapter`` into ``folder`` (created if needed) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, modules, parameters = {}, [], []
    nesting = _expert_nesting([name for name in adapter.layer_names if isinstance(layers[name], ExpertLora)])
    for name in adapter.layer_names:
        layer = layers[name]
        a, b = layer.lora_A[adapter.id].detach().cpu(), layer.lora_B[adapter.id].detach().cpu()
        key = name
        if isinstance(layer, ExpertLora):
            key = layer.module_path + ".base_layer" * nesting[name]
            E, r, _ = a.shape
            a, b = a.reshape(E * r, -1), b.permute(1, 2, 0).reshape(b.shape[1], r * E)  # (E*r, in), (out, r*E)
            parameters.append(name)
        elif getattr(layer, "peft_as_parameter", False):
            parameters.append(f"{name}.weight")
        else:
            modules.append(name)
        # PEFT's saved keys drop the adapter name: base_model.model.<path>.lora_A.weight
        tensors[f"base_model.model.{key}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{key}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=modules,  # exact paths (see the module docstring)
        target_parameters=parameters or None,
        lora_dropout=0.0,
        bias="none",
        # GPT-2's Conv1D stores its weight (in, out); PEFT needs to be told (A/B keep its layout).
        fan_in_fan_out=any(layers[name].fan_in_fan_out for name in adapter.layer_names),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    ).save_pretrained(str(folder))
    return folder


# Where Tinker's exports keep the output head's LoRA, whatever the architecture calls the head
# (tinker-cookbook's weights.build_hf_model and build_lora_adapter map it onto lm_head, or onto
# embed_tokens when the two are tied). peft cannot place it by that name; load such a file with
# PeftModel.from_pretrained(..., key_mapping=TINKER_KEY_MAPPING).
TINKER_HEAD = "model.unembed_tokens"
TINKER_KEY_MAPPING = {r"^model\.unembed_tokens\.": "lm_head."}


def to_tinker_names(folder: Path, head_path: str | None) -> None:
    """Rename the head's LoRA in a saved adapter to Tinker's name (``TINKER_HEAD``): the names
    of a Tinker export (``save_weights_external``), which the cookbook's merge expects. The
    config keeps the head's real path, so the adapter still says what it targets."""
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    prefix = f"base_model.model.{head_path}.lora_"
    if head_path is None or not any(key.startswith(prefix) for key in tensors):
        return  # no LoRA on the head
    renamed = {
        key.replace(prefix, f"base_model.model.{TINKER_HEAD}.lora_", 1) if key.startswith(prefix) else key: value
        for key, value in tensors.items()
    }
    save_file(renamed, str(file), metadata={"format": "pt"})


def _expert_nesting(expert_weights: list[str]) -> dict[str, int]:
    """Expert weight path -> how many targeted weights of its module peft wraps after it."""
    by_module: dict[str, list[str]] = {}
    for name in expert_weights:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    nesting = {}
    for targeted in by_module.values():
        targeted.sort(key=lambda path: EXPERT_WEIGHTS.index(short_name(path)))
        nesting.update({path: len(targeted) - 1 - i for i, path in enumerate(targeted)})
    return nesting


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config (adapter_config.json) and tensors keyed by weight path
    and matrix: {"model.layers.0.self_attn.q_proj": {"A": ..., "B": ...}}, fused expert
    weights by parameter path in the server's layout (A (E, r, in), B (E, out, r)). The
    config's ``target_modules`` come back as short names (what adapters are configured by),
    the targeted parameters' included, whether the folder lists exact paths (our exports)
    or short names (older ones, other tools)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    exact = config.get("target_modules") if isinstance(config.get("target_modules"), list) else []
    targets = set(exact)
    experts = []
    for target in config.get("target_parameters") or []:
        if target.endswith(".weight"):  # a linear layer's weight (see the module docstring)
            targets.add(target.removesuffix(".weight"))
        else:
            targets.add(target)
            if short_name(target) in EXPERT_WEIGHTS:
                experts.append(target)
    if isinstance(config.get("target_modules"), list) or targets:
        config["target_modules"] = sorted({short_name(target) for target in targets})
    by_key = {path.rpartition(".")[0] + ".base_layer" * depth: path for path, depth in _expert_nesting(experts).items()}
    rank = int(config["r"])
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r} in {folder}")
        module, matrix = match["module"], match["matrix"]
        if module in by_key:  # a fused expert weight: back to (E, r, in) / (E, out, r)
            module = by_key[module]
            if matrix == "A":
                value = value.reshape(-1, rank, value.shape[-1])
            else:
                value = value.reshape(value.shape[0], rank, -1).permute(2, 0, 1)
        tensors.setdefault(module, {})[matrix] = value
    if TINKER_HEAD in tensors:  # a Tinker-named export: the head is the target no other tensor is under
        heads = [path for path in exact if path not in tensors and short_name(path) in ("lm_head", "embed_out")]
        tensors[heads[0] if heads else "lm_head"] = tensors.pop(TINKER_HEAD)
    return config, tensors


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)


def peft_remapped(model: torch.nn.Module, paths: list[str]) -> set[str]:
    """The module ``paths`` peft would not put LoRA on if an export listed them in
    ``target_modules``: the export names their weights in ``target_parameters`` instead.

    peft (0.21) rewrites the config of adapters for some transformers-5 MoE architectures
    when it loads one (a compatibility step for adapters trained on transformers 4): on
    DeepSeek-V3, for one, every ``gate_proj``/``up_proj``/``down_proj`` target, however
    exactly spelled, is moved to the fused experts. Asked here of peft itself, path by path
    (it refuses a gate_proj without its up_proj outright), so a peft that stops doing so
    exports those layers as modules again."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a peft without the step: nothing is rewritten
        return set()
    moved = set()
    for path in paths:
        config = LoraConfig(r=1, target_modules=[path])
        try:
            convert_peft_config_for_transformers(config, model=model, conversions=None)
        except Exception:  # noqa: BLE001 - peft refuses it outright: it would not load as written
            moved.add(path)
            continue
        kept = config.target_modules if isinstance(config.target_modules, set | list) else set()
        if path not in set(kept):
            moved.add(path)
    return moved
