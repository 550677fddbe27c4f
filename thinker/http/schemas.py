"""One typed schema per request body, validated at the HTTP edge.

Strict types (no "8" for 8, no true for 1) and no unknown fields: a typo is a 400 that
names the field, not a silently ignored setting. Limits that depend on the server's
configuration (maximum rank, examples per request, ...) are checked in ``api.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thinker.core.errors import BadRequestError, clip

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class AddLoraBody(_Body):
    base_model: str = "base"  # "base" or the server's model name
    rank: int = Field(8, ge=1)
    alpha: FiniteFloat = Field(16.0, gt=0, le=10_000)
    target_modules: list[str] | None = Field(None, min_length=1)  # default: every linear layer
    seed: int | None = Field(None, ge=0, lt=2**63)


class FwdBwdBody(_Body):
    model_id: str
    data: list[list[Message]] = Field(min_length=1)  # conversations
    loss_fn: str = "cross_entropy"


class AdamParamsBody(_Body):
    learning_rate: FiniteFloat = Field(1e-3, gt=0, le=10)
    beta1: FiniteFloat = Field(0.9, ge=0, lt=1)
    beta2: FiniteFloat = Field(0.999, ge=0, lt=1)
    eps: FiniteFloat = Field(1e-8, gt=0, le=1)
    weight_decay: FiniteFloat = Field(0.0, ge=0, le=10)
    grad_clip_norm: FiniteFloat = Field(0.0, ge=0)  # 0: no clipping


class OptimStepBody(_Body):
    model_id: str
    adam_params: AdamParamsBody = Field(default_factory=AdamParamsBody)


class RetrieveFutureBody(_Body):
    request_id: str
    timeout: FiniteFloat | None = Field(None, ge=0)  # seconds to long-poll; capped by the server


class SamplingParamsBody(_Body):
    max_tokens: int = Field(50, ge=1)
    temperature: FiniteFloat = Field(0.7, ge=0, le=100)  # 0: greedy
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: no limit
    seed: int | None = Field(None, ge=0, lt=2**62)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)


class SampleBody(_Body):
    model_id: str  # adapter id, or "base"
    prompts: list[str] = Field(min_length=1)
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)


class ModelIdBody(_Body):
    model_id: str


class SaveStateBody(_Body):
    model_id: str
    name: str | None = Field(None, min_length=1, max_length=200)  # default: step-<step>


class LoadStateBody(_Body):
    path: str  # tinker://<model_id>/weights/<name>


def parse_body(schema: type[_Body], body: object) -> _Body:
    """Validate a decoded JSON body, turning the first problems into one clear 400."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            # Quotes are clipped: a location can be a client's (huge) unknown key.
            where = ".".join(clip(str(part), 100) for part in err["loc"]) or "body"
            problems.append(f"{where}: {clip(err['msg'])}")
        raise BadRequestError("; ".join(problems)) from None
