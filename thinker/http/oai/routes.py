"""``POST /chat/completions`` and ``POST /completions``: parse, resolve ``model``, render
the prompts, check the limits, then answer at once (JSON) or as a stream (streaming.py)."""

from __future__ import annotations

import time
import uuid

from thinker.core.errors import BadRequestError
from thinker.http.oai import render, streaming
from thinker.http.oai.common import bp
from thinker.http.oai.generate import Row, cancelled_on_exit, check_rows, pinned, sampling_params, submit, wait
from thinker.http.oai.models import resolve
from thinker.http.oai.schemas import ChatCompletionBody, CompletionBody
from thinker.http.tinker.common import body


def usage(prompts: list[list[int]], rows: list[Row]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.tokens) for r in rows)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@bp.post("/chat/completions")
def chat_completions():
    req = body(ChatCompletionBody)
    req.check()
    prompt = render.chat_prompt(req.messages)
    check_rows(req.n)
    token_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(
        req.token_limit, req.temperature, req.top_p, req.seed, req.stop_strings, [len(prompt)], "messages", token_field
    )
    target = resolve(req.model)  # last: a checkpoint is loaded only for a request that can run
    prompts = [prompt] * req.n
    header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": target.name}
    top_k = req.top_logprobs if req.logprobs and req.top_logprobs else None  # alternatives: one scoring pass
    if req.stream:
        stream = streaming.ChatStream(
            header, target, prompts, params, len(prompt), req.stream_options, req.logprobs, top_k
        )
        return streaming.response(stream)
    with pinned(target.adapter_id), cancelled_on_exit() as cancel:
        rows = wait(submit(target, prompts, params, score_topk=top_k, cancel=cancel), prompts)
    choices = []
    for i, row in enumerate(rows):
        logprobs = None
        if req.logprobs:
            logprobs = {"content": render.chat_logprobs(row.tokens, row.logprobs, row.top), "refusal": None}
        message = {"role": "assistant", "content": row.text, "refusal": None}
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": row.finish_reason})
    return {**header, "object": "chat.completion", "choices": choices, "usage": usage([prompt], rows)}


@bp.post("/completions")
def completions():
    req = body(CompletionBody)
    req.check()
    fields = [f"prompt[{i}]" if len(req.prompts) > 1 else "prompt" for i in range(len(req.prompts))]
    distinct = [render.completion_prompt(p, field) for p, field in zip(req.prompts, fields, strict=True)]
    texts = [render.prompt_text(p) for p in req.prompts]  # what echo shows: the prompt as sent
    check_rows(len(distinct) * req.n)
    if req.max_tokens == 0 and not req.echo:
        raise BadRequestError("max_tokens: 0 generates nothing; pass echo: true to score the prompt")
    params = sampling_params(
        req.max_tokens, req.temperature, req.top_p, req.seed, req.stop_strings, [len(p) for p in distinct], "prompt"
    )
    target = resolve(req.model)  # last: a checkpoint is loaded only for a request that can run
    prompts = [p for p in distinct for _ in range(req.n)]  # choice index = prompt index * n + j
    header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": target.name}
    if req.stream:
        row_texts = [t for t in texts for _ in range(req.n)]
        prompt_tokens = sum(len(p) for p in distinct)
        stream = streaming.CompletionStream(
            header, target, prompts, params, prompt_tokens, req.stream_options, req.logprobs, row_texts, req.echo
        )
        return streaming.response(stream)
    # A scoring pass only where it adds something: the echoed prompt's logprobs, or alternatives.
    score = req.logprobs if req.logprobs is not None and (req.echo or req.logprobs > 0) else None
    with pinned(target.adapter_id), cancelled_on_exit() as cancel:
        rows = wait(submit(target, prompts, params, score_topk=score, cancel=cancel), prompts)
    choices = []
    for i, row in enumerate(rows):
        prompt_text = texts[i // req.n]
        prefix = prompt_text if req.echo else ""
        offset = 0 if req.echo else len(prompt_text)
        logprobs = None if req.logprobs is None else render.completion_logprobs(row, req.echo, offset)
        choice = {"index": i, "text": prefix + row.text, "logprobs": logprobs, "finish_reason": row.finish_reason}
        choices.append(choice)
    return {**header, "object": "text_completion", "choices": choices, "usage": usage(distinct, rows)}
