"""Prompts in (chat templates, text, token ids) and OpenAI's logprob shapes out."""

from __future__ import annotations

from collections.abc import Sequence

from thinker.core.errors import BadRequestError
from thinker.http.oai.common import services
from thinker.http.oai.generate import Row, TopK
from thinker.http.oai.schemas import ChatMessage


def chat_prompt(messages: Sequence[ChatMessage]) -> list[int]:
    """The conversation in the tokenizer's chat template, then the assistant's turn opening."""
    tokenizer = services().backend.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequestError("messages: this model has no chat template; use /completions with a plain prompt")
    # "developer" is OpenAI's newer name for "system"; chat templates know the older one.
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template's own refusal (roles out of order, ...)
        raise BadRequestError(f"messages: the model's chat template refused them: {exc}") from None
    return _checked(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")


def completion_prompt(prompt: str | list[int], field: str) -> list[int]:
    """A text prompt tokenized as the model's tokenizer does by default (its BOS, if any), or token ids."""
    if isinstance(prompt, str):
        return _checked(services().backend.tokenizer(prompt)["input_ids"], field)
    vocab = services().backend.vocab_size
    if any(t >= vocab for t in prompt):
        raise BadRequestError(f"{field}: token ids must lie in [0, {vocab})")
    return _checked(list(prompt), field)


def prompt_text(prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else services().backend.tokenizer.decode(prompt)


def _checked(tokens: list[int], field: str) -> list[int]:
    if not tokens:
        raise BadRequestError(f"{field}: the prompt has no tokens")
    return tokens


def token_text(token: int) -> str:
    """A token as text; a token holding part of a character's bytes by its vocabulary name
    (so distinct tokens keep distinct names in ``top_logprobs``)."""
    tokenizer = services().backend.tokenizer
    text = tokenizer.decode([token])
    return tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text


def chat_logprobs(tokens: list[int], logprobs: list[float], top: list[TopK] | None) -> list[dict]:
    """``choices[i].logprobs.content``: one entry per generated token."""
    out = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        text = token_text(token)
        alternatives = [] if top is None else top[i]
        out.append({
            "token": text,
            "logprob": logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": (t := token_text(alt)), "logprob": lp, "bytes": list(t.encode())} for alt, lp in alternatives
            ],
        })
    return out


def completion_logprobs(row: Row, echo: bool, offset: int = 0) -> dict:
    """``choices[i].logprobs`` of /completions: parallel lists over the (echoed prompt and)
    generated tokens. Each ``top_logprobs`` entry holds the k likeliest tokens and the
    chosen one (as OpenAI's did), so a harness can tell whether the choice was greedy."""
    tokens: list[int] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if echo:
        prompt_values = row.prompt_logprobs or [None] * len(row.prompt)
        prompt_top = row.prompt_top or [None] * len(row.prompt)
        for i, token in enumerate(row.prompt):
            tokens.append(token)
            values.append(prompt_values[i])
            tops.append(None if i == 0 else _top_dict(prompt_top[i], token, prompt_values[i]))
    gen_top = row.top or [None] * len(row.tokens)
    for i, token in enumerate(row.tokens):
        tokens.append(token)
        values.append(row.logprobs[i])
        tops.append(_top_dict(gen_top[i], token, row.logprobs[i]))
    texts = [token_text(t) for t in tokens]
    offsets, position = [], offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(top: TopK | None, chosen: int, chosen_logprob: float | None) -> dict[str, float]:
    entries = {token_text(t): lp for t, lp in top or ()}
    if chosen_logprob is not None:
        entries[token_text(chosen)] = chosen_logprob
    return entries
