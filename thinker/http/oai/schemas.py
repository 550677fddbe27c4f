"""Request bodies of the OpenAI-compatible API, as the ``openai`` client sends them.

Unknown fields are ignored (clients and harnesses send many: ``user``, ``metadata``, ...);
fields we know are type- and range-checked, so a bad value is a 400 that names it, and a
feature we do not have (tools, penalties, logit bias) is refused by name rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from thinker.core.errors import BadRequestError
from thinker.http.schemas import FiniteFloat

Stop = str | list[Annotated[str, Field(min_length=1)]] | None
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 20 on chat, 5 on completions)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the request's usage and no choices


class _Sampling(_Body):
    """What both endpoints take."""

    model: str  # the served base model, an adapter id or tinker://<run>/sampler_weights/<name>
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)  # choices per prompt
    stop: Stop = Field(None, max_length=16)  # generation ends before any of these strings
    seed: int | None = Field(None, ge=0, lt=2**62)  # the same seed and request: the same tokens
    stream: bool = False  # server-sent events, one chunk per decode step
    stream_options: StreamOptions | None = None
    frequency_penalty: FiniteFloat = 0.0  # not supported: only 0
    presence_penalty: FiniteFloat = 0.0  # not supported: only 0
    logit_bias: dict[str, float] | None = None  # not supported: only empty

    def check(self) -> None:
        """Refuse by name what parsed but this server does not do (a 400 naming the field)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise BadRequestError(f"{name}: not supported by this server (only 0)")
        if self.logit_bias:
            raise BadRequestError("logit_bias: not supported by this server")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) and self.stop else tuple(self.stop or ())


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # text parts only: this server serves text models

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # unset: up to the server's limit or the window's end
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False  # each generated token's logprob
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # and its likeliest alternatives
    tools: list | None = None  # not supported
    response_format: dict | None = None  # only {"type": "text"}

    def check(self) -> None:
        super().check()
        if self.tools:
            raise BadRequestError("tools: not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise BadRequestError("response_format: only {'type': 'text'} is supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise BadRequestError("top_logprobs: needs logprobs: true")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionBody(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]  # text or token ids, one prompt or several
    max_tokens: int = Field(16, ge=0)  # OpenAI's default; 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token
    echo: bool = False  # the prompt comes back before the completion (with its logprobs)
    suffix: str | None = None  # not supported
    best_of: int | None = Field(None, ge=1)  # only equal to n

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise BadRequestError("suffix: not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequestError("best_of: only equal to n is supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise BadRequestError("prompt: no prompt")

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(x, int) for x in self.prompt):
            return [list(self.prompt)]  # one prompt as token ids
        return list(self.prompt)
