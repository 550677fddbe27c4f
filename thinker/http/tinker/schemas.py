"""Request bodies of the Tinker API, as the official SDK sends them.

Unlike the seed API these ignore unknown fields (a newer SDK adds some, and every body
carries a ``type`` tag); types and ranges are still checked, so a bad value is a 400 that
names the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinker.http.schemas import FiniteFloat

SeqId = Annotated[int, Field(ge=0, lt=2**63)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSessionBody(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] = Field(default_factory=dict)


class SessionIdBody(_Body):
    session_id: str


class LoraConfigBody(_Body):
    rank: int = Field(32, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfigBody(_Body):
    type: str = "adamw"


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: SeqId
    base_model: str
    lora_config: LoraConfigBody = Field(default_factory=LoraConfigBody)
    optimizer_config: OptimizerConfigBody = Field(default_factory=OptimizerConfigBody)
    user_metadata: dict[str, str] | None = None


class ModelIdBody(_Body):
    model_id: str


class AdamParamsBody(_Body):
    learning_rate: FiniteFloat = Field(1e-4, ge=0, le=10)
    beta1: FiniteFloat = Field(0.9, ge=0, lt=1)
    beta2: FiniteFloat = Field(0.95, ge=0, lt=1)
    eps: FiniteFloat = Field(1e-12, gt=0, le=1)
    weight_decay: FiniteFloat = Field(0.0, ge=0, le=10)
    grad_clip_norm: FiniteFloat = Field(0.0, ge=0)


class OptimStepBody(_Body):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: AdamParamsBody | None = None
    optimizer_params: dict | None = None


class SaveWeightsBody(_Body):
    model_id: str
    seq_id: SeqId | None = None
    path: str | None = None  # the checkpoint's name
    ttl_seconds: int | None = Field(None, ge=1)
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    # save_weights_for_sampler without a path: make a sampling session instead
    sampling_session_seq_id: SeqId | None = None
    kind: str | None = None
    age_encryption_recipients: list[str] | None = None  # save_weights_external: encrypted (export.py)


class LoadWeightsBody(_Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None  # load into this model (its next seq_id) ...
    seq_id: SeqId | None = None
    session_id: str | None = None  # ... or create a model (session_id, model_seq_id) from it
    model_seq_id: SeqId | None = None
    base_model: str | None = None
    user_metadata: dict[str, str] | None = None


class CreateSamplingSessionBody(_Body):
    session_id: str
    sampling_session_seq_id: SeqId
    base_model: str | None = None
    model_path: str | None = None


class ChunkBody(_Body):
    type: str = "encoded_text"
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default_factory=list)


class ModelInputBody(_Body):
    chunks: list[ChunkBody] = Field(min_length=1)


class SamplingParamsBody(_Body):
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**62)
    stop: str | Annotated[list[str], Field(max_length=64)] | Annotated[list[int], Field(max_length=64)] | None = None
    temperature: FiniteFloat = Field(1.0, ge=0, le=100)
    top_k: int = Field(-1, ge=-1)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)


class SampleBody(_Body):
    sampling_session_id: str | None = None
    base_model: str | None = None  # the legacy stateless form
    model_path: str | None = None
    seq_id: SeqId | None = None
    num_samples: int = Field(1, ge=1)
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(0, ge=0, le=100)
    topk_sample_logprobs: int = Field(0, ge=0)
    prompt_alt_tokens_k: int = Field(0, ge=0)
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    target_prompt_logprobs: dict | None = None
    # Record each sequence for stable_reinforce (thinker/store/recorded_sequences.py)
    record_stability_info: bool | None = None


class RetrieveFutureBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str


class TtlBody(_Body):
    ttl_seconds: int | None = Field(None, ge=3600, le=10 * 365 * 24 * 3600)


Category = Literal["user", "server", "unknown"]
