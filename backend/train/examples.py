"""Training examples as tokens + per-token loss weights, and chat rendering into them.

The engine only ever sees ``Example``s, so chat requests (rendered here, at the edge)
and token-level requests share one training path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thinker.core.errors import BadRequestError


@dataclass(frozen=True, eq=False)
class Example:
    """One training sequence, Tinker-style: the model reads ``input_tokens`` and at each
    position t is scored on predicting ``target_tokens[t]``. ``loss_inputs`` holds what the
    loss function reads, all aligned with the positions: ``target_tokens`` (T,) or (T, K)
    int64, and as the loss needs them ``weights`` (the targets' shape), ``logprobs`` (the
    sampler's, (T,)) and ``advantages`` (T,), float32."""

    input_tokens: torch.Tensor  # (T,) int64
    loss_inputs: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_tokens", torch.as_tensor(self.input_tokens, dtype=torch.long).reshape(-1))
        inputs = dict(self.loss_inputs)
        if "target_tokens" not in inputs:
            raise BadRequestError("loss_fn_inputs.target_tokens is required")
        targets = inputs["target_tokens"] = torch.as_tensor(inputs["target_tokens"], dtype=torch.long)
        T = self.input_tokens.shape[0]
        if targets.dim() not in (1, 2) or targets.shape[0] != T:
            raise BadRequestError(
                f"loss_fn_inputs.target_tokens: shape {list(targets.shape)} does not match the {T} input tokens"
            )
        for key, value in inputs.items():
            if key == "target_tokens":
                continue
            value = inputs[key] = torch.as_tensor(value, dtype=torch.float32)
            expected = targets.shape if key == "weights" else targets.shape[:1]
            if value.shape != expected:
                raise BadRequestError(
                    f"loss_fn_inputs.{key}: shape {list(value.shape)} does not match {list(expected)} "
                    "(one value per target token)"
                )
        object.__setattr__(self, "loss_inputs", inputs)

    @property
    def length(self) -> int:
        return int(self.input_tokens.shape[0])

    @property
    def target_tokens(self) -> torch.Tensor:
        return self.loss_inputs["target_tokens"]

    @property
    def weights(self) -> torch.Tensor:
        return self.loss_inputs["weights"]

    @property
    def num_loss_tokens(self) -> int:
        """Positions that carry loss: a nonzero weight or advantage (every position if neither)."""
        for key in ("weights", "advantages"):
            if key in self.loss_inputs:
                value = self.loss_inputs[key]
                return int((value.reshape(self.length, -1) != 0).any(dim=1).sum())
        return self.length

    @classmethod
    def from_sequence(cls, tokens: Sequence[int], loss_mask: Sequence[float]) -> Example:
        """Shift a whole sequence into next-token form: predict tokens[t+1] from tokens[:t+1]."""
        return cls(
            list(tokens[:-1]),
            {"target_tokens": list(tokens[1:]), "weights": [float(w) for w in loss_mask[1:]]},
        )


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def render_conversation(
    tokenizer, messages: Sequence[dict], field: str = "data", check_length: Callable[[int, str], None] | None = None
) -> Example:
    """Render one conversation with the model's chat template; every assistant turn (its
    content and end-of-turn token) carries weight 1, everything else weight 0.
    ``check_length(tokens, field)`` may refuse the rendered length before the assistant turns
    are located (that costs a render per turn: quadratic in the conversation's size)."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRequestError(f"{field}: the conversation has no assistant turn, so there is nothing to learn")
    text = _render(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens: list[int] = encoding["input_ids"]
    if check_length is not None:
        check_length(len(tokens), field)
    spans: list[tuple[int, int]] = []  # character ranges of assistant turns in text
    for i in assistant_turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise BadRequestError(
                f"{field}: the model's chat template does not render conversations prefix by "
                "prefix, so assistant turns cannot be located"
            )
        # Learn the content and the end-of-turn marker, not the whitespace after it.
        end = len(before) + len(through[len(before) :].rstrip())
        spans.append((len(before), end))
    mask = [1.0 if any(lo <= start < hi for lo, hi in spans) else 0.0 for start, _ in encoding["offset_mapping"]]
    if len(tokens) < 2 or sum(mask[1:]) == 0:
        raise BadRequestError(f"{field}: the assistant turns render to no trainable tokens")
    return Example.from_sequence(tokens, mask)


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt as one user turn followed by the assistant generation prompt."""
    text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
