"""``stream: true``: server-sent events, ``data: {chunk}`` per decode step and ``data: [DONE]``.

The rows' tokens come from the decode loop as they are made (the engine's ``on_tokens``),
through a queue, to the HTTP thread that writes the events. Text that could still turn
into a stop string is held back (so a stream never shows any part of one), as is a
character whose UTF-8 bytes are not all there yet; the last chunk of each choice carries
the rest of its text and its ``finish_reason``.

When the stream ends before its rows do (the client went away: waitress's write fails and
it closes the response; or the wait timed out), ``close`` cancels the request, so its rows
leave the decode loop instead of decoding on to max_tokens for nobody.
"""

from __future__ import annotations

import abc
import json
import queue
import threading
from collections.abc import Iterator

from flask import Response, stream_with_context

from thinker.http import caps
from thinker.http.oai import render
from thinker.http.oai.common import error_body, services
from thinker.http.oai.generate import Cancel, Row, pinned, row_of, submit, top_alternatives
from thinker.http.oai.models import Target
from thinker.store.futures import COMPLETED, FAILED

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # (no proxy buffering either)


def response(stream: _Stream) -> Response:
    # stream_with_context: the events are written with the app and request at hand (the
    # tokenizer, the caller); keep_open_until_closed: the stream counts against the caller's
    # MAX_OPEN_REQUESTS_PER_USER until it ends.
    answer = Response(stream_with_context(stream.events()), mimetype="text/event-stream", headers=HEADERS)
    answer.call_on_close(stream.close)
    caps.keep_open_until_closed(answer)
    return answer


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Holdback:
    """One choice's text as it streams: what can be shown now."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, tokens: list[int]) -> str:
        """The text the new tokens add that is safe to show."""
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = len(text.rstrip("\ufffd"))  # a character whose bytes are not all there yet
        for stop in self.stops:
            at = text.find(stop)
            if 0 <= at < safe:
                safe = at
            # Hold back the longest tail that a stop string starts with.
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        return self._show(text[:safe])

    def finish(self, final_text: str) -> str:
        """The rest of the choice's text (its final text is cut before any stop string)."""
        return self._show(final_text)

    def _show(self, text: str) -> str:
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


class _Stream(abc.ABC):
    """One streamed request: its rows in the decode loop and the events they make."""

    object_name = ""

    def __init__(
        self, header: dict, target: Target, prompts: list[list[int]], params, prompt_tokens: int, stream_options
    ) -> None:
        s = services()
        self.header, self.target, self.prompts, self.prompt_tokens = header, target, prompts, prompt_tokens
        self.backend, self.timeout_s = s.backend, s.config.sample_timeout_s
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.holdbacks = [Holdback(self.backend.tokenizer, params.stop) for _ in prompts]
        self.received: list[list[int]] = [[] for _ in prompts]  # each row's tokens so far
        self.received_logprobs: list[list[float]] = [[] for _ in prompts]
        self.sent = [0] * len(prompts)  # tokens of each row whose logprobs went out
        self._items: queue.SimpleQueue = queue.SimpleQueue()  # (row, tokens, logprobs); None: finished
        self.cancel = Cancel()
        self._pin = pinned(target.adapter_id)
        self._pin.__enter__()
        try:
            self.future = submit(target, prompts, params, on_tokens=self._on_tokens, cancel=self.cancel)
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._wait, name="thinker-oai-stream", daemon=True).start()

    def _on_tokens(self, row: int, tokens: list[int], logprobs: list[float]) -> None:
        self._items.put((row, tokens, logprobs))  # (on the decode loop's thread: only a put)

    def _wait(self) -> None:
        self.future.wait(self.timeout_s)
        self._items.put(None)  # after the rows' last tokens: the engine passes those before finishing

    def close(self) -> None:
        """The response is closed (its last event written, or the client gone)."""
        self.cancel()  # (nothing to do once the rows are done)
        if self._pin is not None:
            self._pin.__exit__(None, None, None)
            self._pin = None

    def events(self) -> Iterator[str]:
        yield from self.opening()
        while (item := self._items.get()) is not None:
            row, tokens, logprobs = item
            self.received[row] += tokens
            self.received_logprobs[row] += logprobs
            delta = self.holdbacks[row].push(tokens)
            if delta:
                yield sse(self.chunk(row, delta, None))
        if self.future.status != COMPLETED:
            message = self.future.error if self.future.status == FAILED else "sampling did not finish in time"
            yield sse(error_body(message or "sampling failed", 500))
            yield sse("[DONE]")
            return
        rows = [row_of(seq, p) for seq, p in zip(self.future.result["sequences"], self.prompts, strict=True)]
        for i, row in enumerate(rows):
            # Tokens not streamed (no decode loop: BATCHING=false) arrive with the result.
            self.received[i] = row.tokens
            self.received_logprobs[i] = row.logprobs
            yield sse(self.chunk(i, self.holdbacks[i].finish(row.text), row.finish_reason))
        if self.include_usage:
            completion_tokens = sum(len(r.tokens) for r in rows)
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": self.prompt_tokens + completion_tokens}
            yield sse({**self.header, "object": self.object_name, "choices": [], "usage": usage})
        yield sse("[DONE]")

    def take_logprobs(self, row: int) -> tuple[list[int], list[float], list[int]]:
        """The row's tokens whose logprobs have not gone out yet, and the tokens before them."""
        start, end = self.sent[row], len(self.received[row])
        self.sent[row] = end
        before = self.received[row][:start]
        return self.received[row][start:end], self.received_logprobs[row][start:end], before

    def wrap(self, choice: dict) -> dict:
        chunk = {**self.header, "object": self.object_name, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> Iterator[str]:
        return iter(())

    @abc.abstractmethod
    def chunk(self, row: int, text: str, finish_reason: str | None) -> dict:
        """One event's body for ``row``: the chat or the completions chunk shape."""


class ChatStream(_Stream):
    object_name = "chat.completion.chunk"

    def __init__(self, header, target, prompts, params, prompt_tokens, stream_options, logprobs: bool, top_k) -> None:
        self.logprobs, self.top_k = logprobs, top_k  # top_k: alternatives per token, or None
        super().__init__(header, target, prompts, params, prompt_tokens, stream_options)

    def opening(self) -> Iterator[str]:
        for i in range(len(self.prompts)):
            delta = {"role": "assistant", "content": ""}
            yield sse(self.wrap({"index": i, "delta": delta, "logprobs": None, "finish_reason": None}))

    def chunk(self, row: int, text: str, finish_reason: str | None) -> dict:
        logprobs = None
        if self.logprobs:
            tokens, values, before = self.take_logprobs(row)
            top = None
            if self.top_k and tokens:
                top = top_alternatives(self.target.adapter_id, self.prompts[row] + before, tokens, self.top_k)
            logprobs = {"content": render.chat_logprobs(tokens, values, top), "refusal": None}
        delta = {"content": text} if text or finish_reason is None else {}
        return self.wrap({"index": row, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})


class CompletionStream(_Stream):
    object_name = "text_completion"

    def __init__(self, header, target, prompts, params, prompt_tokens, stream_options, logprobs, texts, echo) -> None:
        self.logprobs, self.texts, self.echo = logprobs, texts, echo  # texts: each row's prompt as text
        # text_offset of each row's next token (as at once: the completion's follow the prompt's text)
        self.offsets = [0 if echo else len(text) for text in texts]
        super().__init__(header, target, prompts, params, prompt_tokens, stream_options)

    def opening(self) -> Iterator[str]:
        if not self.echo:
            return
        scored: dict[tuple[int, ...], tuple] = {}
        for i, prompt in enumerate(self.prompts):
            logprobs = None
            if self.logprobs is not None:
                key = tuple(prompt)
                if key not in scored:
                    scored[key] = self.backend.prompt_logprobs(self.target.adapter_id, prompt, self.logprobs)
                values, top = scored[key]
                row = Row(prompt, [], [], "", "", values, top)
                logprobs = render.completion_logprobs(row, echo=True)
                self.offsets[i] = len(self.texts[i])
            yield sse(self.wrap({"index": i, "text": self.texts[i], "logprobs": logprobs, "finish_reason": None}))

    def chunk(self, row: int, text: str, finish_reason: str | None) -> dict:
        logprobs = None
        if self.logprobs is not None:
            tokens, values, before = self.take_logprobs(row)
            top = top_alternatives(self.target.adapter_id, self.prompts[row] + before, tokens, self.logprobs) \
                if self.logprobs and tokens else None
            part = Row(self.prompts[row], tokens, values, "", "", top=top)
            logprobs = render.completion_logprobs(part, echo=False, offset=self.offsets[row])
            self.offsets[row] += sum(len(t) for t in logprobs["tokens"])
        return self.wrap({"index": row, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
