"""Adapter state in and out of checkpoints: save, load into an adapter, create from one,
and frozen in-memory snapshots for samplers. Called on the compute thread (engine.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from backend.lora.adapters import Adapter, LiveAdapters, new_optimizer
from backend.lora.layer import MultiLoraLinear, short_name
from backend.lora.peft_files import load_optimizer_state, read_peft_adapter, save_optimizer, save_peft_adapter
from thinker.core.errors import BadRequestError


def save_state(adapter: Adapter, layers: dict[str, MultiLoraLinear], base_path: str, folder: Path, optimizer: bool):
    save_peft_adapter(adapter, layers, base_path, folder)
    if optimizer:
        # A frozen adapter has no optimizer: its checkpoint gets fresh moments, as a new one would.
        save_optimizer(adapter.optimizer or new_optimizer(adapter.params), folder)


def checkpoint_config(folder: Path) -> tuple[int, float, list[str]]:
    """(rank, alpha, target module short names) of a saved adapter."""
    config, _ = read_peft_adapter(folder)
    targets = config.get("target_modules") or []
    return int(config["r"]), float(config["lora_alpha"]), sorted(targets)


def load_into(adapter: Adapter, layers: dict[str, MultiLoraLinear], folder: Path, optimizer: bool) -> None:
    """Overwrite ``adapter``'s weights (and optimizer state) with the checkpoint's; the
    checkpoint must have the same rank and target modules."""
    config, tensors = read_peft_adapter(folder)
    rank, targets = int(config["r"]), sorted(config.get("target_modules") or [])
    if rank != adapter.rank or targets != sorted(adapter.target_modules):
        raise BadRequestError(
            f"path: the checkpoint has rank {rank} on {targets}; model {adapter.id} has rank {adapter.rank} on "
            f"{sorted(adapter.target_modules)}"
        )
    if set(tensors) != set(adapter.layer_names):
        raise BadRequestError("path: the checkpoint's layers do not match this model's")
    with torch.no_grad():
        for name in adapter.layer_names:
            layers[name].lora_A[adapter.id].copy_(tensors[name]["A"])
            layers[name].lora_B[adapter.id].copy_(tensors[name]["B"])
    for p in adapter.params:
        p.grad = None
    if adapter.optimizer is None:  # frozen sampler weights: there are no moments to load
        return
    if optimizer:
        if not (folder / "optimizer.pt").exists():
            raise BadRequestError("path: this checkpoint holds no optimizer state (it was saved for sampling)")
        adapter.optimizer.load_state_dict(load_optimizer_state(folder))
    else:
        adapter.optimizer.state.clear()  # fresh moments, as in a new optimizer


def create_from(
    registry: LiveAdapters,
    layers: dict[str, MultiLoraLinear],
    folder: Path,
    adapter_id: str | None,
    optimizer: bool,
    trainable: bool,
    owner: str | None = None,
) -> Adapter:
    rank, alpha, targets = checkpoint_config(folder)
    known = {short_name(name) for name in layers}
    if not set(targets) <= known:
        raise BadRequestError(f"path: the checkpoint targets {sorted(set(targets) - known)}, not layers of this model")
    adapter = registry.create(rank, alpha, targets, 0, adapter_id=adapter_id, trainable=trainable, owner=owner)
    try:
        load_into(adapter, layers, folder, optimizer)
    except BaseException:
        registry.remove(adapter.id)
        raise
    return adapter


def snapshot(
    registry: LiveAdapters, layers: dict[str, MultiLoraLinear], source: Adapter, adapter_id: str
) -> Adapter:
    """A frozen copy of ``source``'s current weights under ``adapter_id``."""
    copy = registry.create(
        source.rank, source.alpha, source.target_modules, 0, adapter_id=adapter_id, trainable=False, owner=source.owner
    )
    with torch.no_grad():
        for name in source.layer_names:
            layers[name].lora_A[copy.id].copy_(layers[name].lora_A[source.id])
            layers[name].lora_B[copy.id].copy_(layers[name].lora_B[source.id])
    copy.step = source.step
    return copy
