"""Training examples as tokens + per-token loss weights, and chat rendering into them.

The engine only ever sees ``Example``s, so chat requests (rendered here, at the edge)
and token-level requests share one training path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from errors import BadRequestError


@dataclass(frozen=True)
class Example:
    """One training sequence, Tinker-style: the model reads ``input_tokens`` and at each
    position t is scored on predicting ``target_tokens[t]`` with weight ``weights[t]``."""

    input_tokens: list[int]  # (T,)
    target_tokens: list[int]  # (T,)
    weights: list[float]  # (T,), 0 where a token is context only

    def __post_init__(self) -> None:
        if not (len(self.input_tokens) == len(self.target_tokens) == len(self.weights)):
            raise BadRequestError(
                "input_tokens, target_tokens and weights must have the same length, got "
                f"{len(self.input_tokens)}, {len(self.target_tokens)}, {len(self.weights)}"
            )

    @property
    def length(self) -> int:
        return len(self.input_tokens)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for w in self.weights if w != 0)

    @classmethod
    def from_sequence(cls, tokens: Sequence[int], loss_mask: Sequence[float]) -> Example:
        """Shift a whole sequence into next-token form: predict tokens[t+1] from tokens[:t+1]."""
        return cls(list(tokens[:-1]), list(tokens[1:]), [float(w) for w in loss_mask[1:]])


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def render_conversation(tokenizer, messages: Sequence[dict], field: str = "data") -> Example:
    """Render one conversation with the model's chat template; every assistant turn (its
    content and end-of-turn token) carries weight 1, everything else weight 0."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRequestError(f"{field}: the conversation has no assistant turn, so there is nothing to learn")
    text = _render(tokenizer, messages)
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
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens: list[int] = encoding["input_ids"]
    mask = [1.0 if any(lo <= start < hi for lo, hi in spans) else 0.0 for start, _ in encoding["offset_mapping"]]
    if len(tokens) < 2 or sum(mask[1:]) == 0:
        raise BadRequestError(f"{field}: the assistant turns render to no trainable tokens")
    return Example.from_sequence(tokens, mask)


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt as one user turn followed by the assistant generation prompt."""
    text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
