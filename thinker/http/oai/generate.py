"""Running an OpenAI request on the engine: its rows join the shared decode loop through
the worker pool (so the pool's caps, ordering and metrics apply, as for every sampling
request), and, when logprobs are asked for, one scoring forward over each finished row
gives the prompt's logprobs (``echo``) and each token's likeliest alternatives.

A live adapter's requests keep their place in its queue (behind training sent before, and
scored before the next step changes its weights); the base model and frozen checkpoints
need no order, so their requests run side by side.

A request nobody waits for any more (its stream's client went away, its wait timed out) is
cancelled (``Cancel``): its rows leave the decode loop at the next step, or never join it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from backend import SamplingParams
from thinker.core.errors import BadRequestError, RequestFailedError, ServerError
from thinker.http.oai.common import services
from thinker.http.oai.models import Target
from thinker.store.futures import FAILED, FutureRecord

TopK = list[tuple[int, float]]  # (token id, logprob), likeliest first


@dataclass
class Row:
    """One choice: its prompt, what it generated, and (when asked) the scores."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # the model's logprob of each generated token
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_logprobs: list[float | None] | None = None  # None at position 0, which has no context
    prompt_top: list[TopK | None] | None = None
    top: list[TopK] | None = None  # alternatives for each generated token


def sampling_params(
    max_tokens: int | None, temperature: float, top_p: float, seed: int | None, stop: tuple[str, ...],
    prompt_lengths: Sequence[int], field: str, token_field: str = "max_tokens",
) -> SamplingParams:
    """The engine's parameters, after the server's limits: MAX_SAMPLE_TOKENS and the context window."""
    s = services()
    limit, window = s.config.max_sample_tokens, s.backend.loaded.context_length
    if max_tokens is not None and max_tokens > limit:
        raise BadRequestError(f"{token_field}: {max_tokens} is over this server's limit of {limit}")
    longest = max(prompt_lengths)
    if longest >= window:
        raise BadRequestError(f"{field}: {longest} tokens fill the model's context window of {window}")
    if max_tokens is not None and longest + max_tokens > window:
        raise BadRequestError(
            f"{token_field}: {longest} prompt tokens + {max_tokens} exceed the model's context window of {window}"
        )
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else min(limit, window - longest),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )


def check_rows(rows: int) -> None:
    limit = services().config.max_prompts_per_request
    if rows > limit:
        raise BadRequestError(f"n: {rows} choices in all, over this server's limit of {limit} per request")


@contextlib.contextmanager
def pinned(adapter_id: str | None) -> Iterator[None]:
    """Keep the adapter in memory (a checkpoint is never freed) while a request uses it."""
    adapters = services().backend.adapters
    if adapter_id is not None:
        adapters.pin(adapter_id)
    try:
        yield
    finally:
        if adapter_id is not None:
            adapters.unpin(adapter_id)


CANCELLED = "cancelled: nobody waits for this sample any more (the client went away or stopped waiting)"


class Cancel:
    """Calling it cancels a request's rows in the decode loop, whether the pool has run its
    job yet or not (a live adapter's job may wait behind training): a job not started yet
    submits nothing, a running one's engine future is cancelled (engine.py). Idempotent, and
    a no-op once the rows are done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested = False
        self._engine: Future | None = None

    def __call__(self) -> None:
        with self._lock:
            self.requested, engine = True, self._engine
        if engine is not None:
            engine.cancel()

    def attach(self, engine: Future) -> None:
        """The engine's future for the request, once submitted."""
        with self._lock:
            self._engine, requested = engine, self.requested
        if requested:
            engine.cancel()


@contextlib.contextmanager
def cancelled_on_exit() -> Iterator[Cancel]:
    """A ``Cancel`` called when the block ends: a wait that ends early (a timeout, an error)
    leaves no rows decoding for nobody; after a finished request it does nothing."""
    cancel = Cancel()
    try:
        yield cancel
    finally:
        cancel()


def submit(
    target: Target,
    prompts: list[list[int]],
    params: SamplingParams,
    score_topk: int | None = None,
    on_tokens: Callable[[int, list[int], list[float]], None] | None = None,
    cancel: Cancel | None = None,
) -> FutureRecord:
    """Queue the rows; the future's result is ``{"sequences": [...]}`` (what metrics count).
    ``score_topk``: also score each row (prompt logprobs, ``score_topk`` alternatives per
    token); None: no scoring. ``on_tokens``: each row's new tokens after every decode step.
    ``cancel``: drops the rows when called; the future then fails (RequestFailedError)."""
    s = services()
    backend, adapter_id = s.backend, target.adapter_id

    def score(sequences: list[dict]) -> list[dict]:
        if score_topk is None:
            return sequences
        seen: dict[tuple[int, ...], tuple] = {}  # n identical rows (greedy) are scored once
        for seq, prompt in zip(sequences, prompts, strict=True):
            whole = (*prompt, *seq["tokens"])
            if whole not in seen:
                seen[whole] = backend.prompt_logprobs(adapter_id, list(whole), score_topk)
            values, top = seen[whole]
            seq["prompt_logprobs"] = values[: len(prompt)]
            seq["top"] = top  # alternatives at every position, prompt's and completion's (row_of splits them)
        return sequences

    def job() -> Future:
        result: Future = Future()
        if cancel is not None and cancel.requested:
            raise RequestFailedError(CANCELLED)
        if params.max_tokens == 0:  # scoring only (echo): no decoding at all
            result.set_result({"sequences": score([_sequence(None) for _ in prompts])})
            return result
        if backend.sampler is None:  # no shared decode loop (BATCHING=false): a batch of its own
            completions = backend.complete(adapter_id, prompts, params)
            result.set_result({"sequences": score([_sequence(c) for c in completions])})
            return result

        def finish(engine: Future) -> None:
            try:
                result.set_result({"sequences": score([_sequence(c) for c in engine.result()])})
            except BaseException as exc:  # noqa: BLE001 - the request's answer
                result.set_exception(exc)

        def done(engine: Future) -> None:
            if engine.cancelled():  # (on the canceller's thread) the pool's job must still end
                result.set_exception(RequestFailedError(CANCELLED))
            elif engine.exception() is not None or score_topk is None:
                finish(engine)
            else:  # off the decode loop's thread: the scoring forward must not stall it
                threading.Thread(target=finish, args=(engine,), name="thinker-oai-score", daemon=True).start()

        engine = backend.complete_async(adapter_id, prompts, params, on_tokens=on_tokens)
        engine.add_done_callback(done)
        if cancel is not None:
            cancel.attach(engine)
        return result

    return s.pool.submit(None if target.frozen else adapter_id, "sample", job)


def _sequence(completion) -> dict:
    if completion is None:
        return {"tokens": [], "logprobs": [], "text": "", "stop_reason": "length"}
    return {
        "tokens": completion.tokens,
        "logprobs": completion.logprobs,
        "text": completion.text,
        "stop_reason": completion.stop_reason,
    }


def wait(future: FutureRecord, prompts: list[list[int]]) -> list[Row]:
    """The finished rows, or the job's error."""
    timeout = services().config.sample_timeout_s
    if not future.wait(timeout):
        raise ServerError(f"sampling did not finish within {timeout:g}s")
    if future.status == FAILED:
        if future.error_type == "BadRequestError":
            raise BadRequestError(future.error)
        raise RequestFailedError(future.error)
    return [row_of(seq, prompt) for seq, prompt in zip(future.result["sequences"], prompts, strict=True)]


def row_of(seq: dict, prompt: list[int]) -> Row:
    top = seq.get("top")
    return Row(
        prompt=prompt,
        tokens=list(seq["tokens"]),
        logprobs=list(seq["logprobs"]),
        text=seq["text"],
        finish_reason=seq["stop_reason"],
        prompt_logprobs=seq.get("prompt_logprobs"),
        prompt_top=None if top is None else top[: len(prompt)],
        top=None if top is None else top[len(prompt):],
    )


def top_alternatives(adapter_id: str | None, prompt: list[int], tokens: list[int], k: int) -> list[TopK]:
    """The ``k`` likeliest tokens at each of ``tokens``' positions (one forward; for streams)."""
    _, top = services().backend.prompt_logprobs(adapter_id, prompt + tokens, k)
    return top[len(prompt):] if top is not None else [[] for _ in tokens]
