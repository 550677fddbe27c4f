"""Load the one shared base model (and its tokenizer), with the offline fallback.

Resolution order: an explicit ``BASE_MODEL`` must load or the server refuses to start;
without one, the default hub model is tried from the local cache, then from the hub if
the hub answers at all, and otherwise builtin-tiny is loaded and the reason is kept for
``/healthz`` and logged as a WARNING.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from torch import nn

from backend.lora.experts import wrap_experts
from backend.lora.layer import MultiLoraLinear, is_lora_target, short_name, wrap_linear_layers
from backend.lora.peft_files import peft_remapped
from backend.model.builtin_tiny import ensure_builtin_tiny
from thinker.core.config import BUILTIN_TINY, DEFAULT_BASE_MODEL, DEVICE_PATTERN, Config
from thinker.core.errors import ConfigurationError

log = logging.getLogger("thinker.backend")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what clients may pass as base_model, e.g. "builtin-tiny" or a hub id
    path: str  # where it was loaded from (hub id or folder)
    device: torch.device
    dtype: torch.dtype
    context_length: int
    # LoRA-wrapped weights by path: MultiLoraLinear layers, and ExpertLora (backend/lora/experts.py)
    # for each fused MoE expert weight (model.layers.1.mlp.experts.gate_up_proj)
    lora_layers: dict[str, MultiLoraLinear]
    fallback_reason: str | None = None
    target_modules: list[str] = field(default_factory=list)  # short names adapters may target
    head_module: str | None = None  # short name of the output head when LoRA may target it too
    # Weights LoRA cannot target here, short name -> why (fused MoE experts of a layout not
    # covered); named in the 400 that refuses them (see ``why_not_targets``)
    unsupported: dict[str, str] = field(default_factory=dict)
    fused_experts: list[str] = field(default_factory=list)  # paths of fused 3-D expert weights

    def why_not_targets(self, names) -> str:
        """Why these short names are not LoRA targets of this model ("" when none is known)."""
        return "; ".join(f"{name}: {self.unsupported[name]}" for name in sorted(names) if name in self.unsupported)

    @property
    def public_name(self) -> str:
        """The model's name for anyone to see: a local folder's own name, never its path."""
        return os.path.basename(os.path.normpath(self.name)) if os.path.isdir(self.name) else self.name

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's (V, H) weight, under its LoRA wrapper if it has one."""
        head = self.model.get_output_embeddings()
        return head.base.weight if isinstance(head, MultiLoraLinear) else head.weight


def pick_device(requested: str | None) -> torch.device:
    """The device to load on: ``DEVICE`` checked against what this machine and torch build have."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.fullmatch(requested):  # (Config.validate says so first; tests build Configs directly)
        raise ConfigurationError(f"DEVICE={requested!r} is not a device: use cpu, cuda, cuda:N or mps (or unset it)")
    device = torch.device(requested)
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ConfigurationError(
                f"DEVICE={requested} but this torch build ({torch.__version__}) has no CUDA support; "
                "install the CUDA build of torch (see README) or unset DEVICE"
            )
        if not torch.cuda.is_available():
            raise ConfigurationError(f"DEVICE={requested} but no CUDA GPU is visible; unset DEVICE to use the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            visible = torch.cuda.device_count()
            raise ConfigurationError(f"DEVICE={requested} but only {visible} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"DEVICE={requested} but MPS is not available on this machine")
    return device


def load_base_model(config: Config) -> LoadedModel:
    """Load the configured base model, wrap its linear layers for LoRA and freeze it."""
    device = pick_device(config.device)
    if config.base_model:
        name = config.base_model
        log.info("Loading base model from %s...", name)
        local_only = _check_source(name)
        try:
            return _load(name, device, config, local_files_only=local_only)
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is fatal, with its reason
            raise ConfigurationError(f"BASE_MODEL={name!r} could not be loaded: {exc}") from exc

    log.info("Loading base model from %s...", DEFAULT_BASE_MODEL)
    try:
        return _load(DEFAULT_BASE_MODEL, device, config, local_files_only=True)
    except Exception as cached_exc:  # noqa: BLE001
        reason = f"not in the local Hugging Face cache ({type(cached_exc).__name__})"
    if _hub_reachable():
        try:
            return _load(DEFAULT_BASE_MODEL, device, config)
        except Exception as exc:  # noqa: BLE001
            reason = f"download failed: {exc}"
    else:
        reason += " and the Hugging Face hub is unreachable"
    reason = f"{DEFAULT_BASE_MODEL} could not be loaded: {reason}"
    log.warning("%s. FALLING BACK to the built-in tiny model (%s); set BASE_MODEL to choose.", reason, BUILTIN_TINY)
    loaded = _load(BUILTIN_TINY, device, config)
    loaded.fallback_reason = reason
    return loaded


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and os.path.exists(name) or name.count("/") > 1


def _check_source(name: str) -> bool:
    """Refuse at once what cannot load (a missing folder, a hub id offline and not cached)
    instead of after the hub client's minutes of retries. True: load from local files only."""
    if name == BUILTIN_TINY:
        return True
    if _looks_like_path(name):
        folder = os.path.expanduser(name)
        if not os.path.isdir(folder):
            raise ConfigurationError(f"BASE_MODEL={name!r}: folder not found")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigurationError(f"BASE_MODEL={name!r}: the folder has no config.json (not a model folder)")
        return True
    if _in_hub_cache(name):
        return True
    if not _hub_reachable():
        raise ConfigurationError(
            f"BASE_MODEL={name!r} is not in the local Hugging Face cache and the hub cannot be reached; "
            "download it where the hub is reachable, or point BASE_MODEL at a local folder (or builtin-tiny)"
        )
    return False


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id either
        raise ConfigurationError(
            f"BASE_MODEL={name!r} is neither a local folder nor a Hugging Face hub id (org/name)"
        ) from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine falls back in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load(name: str, device: torch.device, config: Config, local_files_only: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(ensure_builtin_tiny(config.thinker_cache_dir)) if name == BUILTIN_TINY else name
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_files_only)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigurationError(f"{name} has no chat template; thinker renders conversations with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()  # no dropout: LoRA training here is deterministic given the data
    model.requires_grad_(False)
    layers, names, head_name = wrap_for_lora(model)
    if not names:
        raise ConfigurationError(f"{name} has no linear layers (nn.Linear or Conv1D) for LoRA to target")
    names, unsupported, experts = _restrict_targets(model, layers, names)
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        device=device,
        dtype=dtype,
        context_length=context,
        lora_layers=layers,
        target_modules=names,
        head_module=head_name,
        unsupported=unsupported,
        fused_experts=experts,
    )


def wrap_for_lora(model: nn.Module) -> tuple[dict[str, MultiLoraLinear], list[str], str | None]:
    """Wrap every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) and the output head for
    LoRA. Returns the wrapped layers by path, the short names adapters may target (the head
    apart) and the head's short name (None when the head is not a linear layer)."""
    head = model.get_output_embeddings()
    names = sorted(
        {short_name(path) for path, module in model.named_modules() if is_lora_target(module) and module is not head}
    )
    layers = wrap_linear_layers(model, names) if names else {}
    head_name = None
    if isinstance(head, nn.Linear):
        # The output head takes LoRA too (Tinker's train_unembed), but only when asked; its
        # bias (if any) stays in the base output, exactly as PEFT treats it.
        head_path = next(path for path, module in model.named_modules() if module is head)
        head_name = short_name(head_path)
        layers.update(wrap_linear_layers(model, [head_name]))
    return layers, names, head_name


def _restrict_targets(
    model: nn.Module, layers: dict[str, MultiLoraLinear], names: list[str]
) -> tuple[list[str], dict[str, str], list[str]]:
    """Put LoRA on the fused MoE expert weights too, and mark the linear layers whose
    export must name their weight in peft's ``target_parameters`` (see
    peft_files.peft_remapped). Returns the targets (short names, expert weights included),
    the short names refused with why (3-D expert weights of a layout not supported) and the
    fused experts' parameter paths."""
    experts = [path for path, param in model.named_parameters() if param.dim() == 3 and "expert" in path]
    wrapped = wrap_experts(model)
    layers.update(wrapped)
    unsupported = {}
    # (a name that is also a linear layer's stays a target: for that layer)
    for name in sorted({short_name(path) for path in experts if path not in wrapped} - set(names)):
        example = next(path for path in experts if short_name(path) == name and path not in wrapped)
        unsupported[name] = (
            f"fused MoE expert weights (3-D parameters such as {example}) of a layout LoRA here does not cover "
            "(transformers' fused experts: gate_up_proj and down_proj, a gate, no norm after the experts)"
        )
    for path in peft_remapped(model, [path for path, layer in layers.items() if isinstance(layer, MultiLoraLinear)]):
        layers[path].peft_as_parameter = True  # read by peft_files.save_peft_adapter
    names = sorted(set(names) | {short_name(path) for path in wrapped})
    return [name for name in names if name not in unsupported], unsupported, experts
