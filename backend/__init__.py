"""Model execution: loading the shared base model, multi-adapter LoRA, losses, sampling."""

from backend.engine import AdamParams, HFBackend
from backend.model_loading import LoadedModel, load_base_model
from backend.sampling import SamplingParams
from backend.training import FwdBwdRequest

__all__ = ["AdamParams", "FwdBwdRequest", "HFBackend", "LoadedModel", "SamplingParams", "load_base_model"]
