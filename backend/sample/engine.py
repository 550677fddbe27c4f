"""Continuous batching for sampling: one decode loop shared by every sampling request.

Requests (from any adapters, or the base model) join the running batch instead of waiting
for it to drain: each loop iteration runs one prefill chunk of the newest requests (see
decode.py) and one decode step of every row already decoding, so a long prompt joining
costs the others a chunk's time per step, not its whole prefill. Each request keeps its own
adapter, sampling parameters and seed, and its future completes as soon as its own rows
are done.

Streaming: ``submit(rows, on_tokens)`` calls ``on_tokens(row_index, tokens, logprobs)`` on
the loop's thread after every step, with the tokens each row of that request produced in it
(in ``Completion.tokens`` order: what ends up in ``tokens``), before its future completes.
A callback that raises fails that request only. The future's completions stay
authoritative (text cut at stop strings, stop_reason).

Cancelling: ``future.cancel()`` on the future ``submit`` returned (it succeeds until the
request has finished: the loop never sets it running). A request still queued is dropped at
once; a request in the batch is dropped at the next step (its rows' ``abandoned``: see
decode.py), and an unfinished prefill of its rows alone is skipped. The others' tokens do
not change: a row's computation does not depend on its batch company. The loop never
completes a cancelled future, and stops calling its ``on_tokens`` (a call under way as it is
cancelled, on the loop's thread, still ends).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from backend import failures
from backend.sample.decode import PREFILL_TOKENS, DecodeBatch, LiveRow
from backend.sample.sampling import Completion, SampleRow, check_prompts

log = logging.getLogger("thinker.sampling")

GATHER_WINDOWS = 20  # the most an idle loop waits for company: 20 x window_s (100 ms by default)

OnTokens = Callable[[int, list[int], list[float]], None]


@dataclass(eq=False)  # (compared by identity: the pending queue removes a cancelled one)
class _Request:
    rows: list[SampleRow]
    future: Future
    on_tokens: OnTokens | None = None
    completions: list[Completion | None] = field(default_factory=list)
    remaining: int = 0
    live: list[LiveRow] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # tokens of each row handed to on_tokens
    error: BaseException | None = None  # set when it failed; its future is set by the loop
    cancelled: bool = False  # its caller cancelled its future (a plain flag: read per row per step)

    def failed(self) -> bool:
        return self.error is not None

    def abandoned(self) -> bool:
        """Nobody wants its rows any more: it failed, or its caller cancelled it."""
        return self.error is not None or self.cancelled


class SamplingEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        eos_ids: set[int],
        context_length: int,
        device: torch.device,
        max_rows: int = 64,
        window_s: float = 0.005,
        run=None,
        hold=None,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        """``run(fn, *args)`` executes model work where the backend wants it (its compute
        thread on CPU); by default, on this engine's own thread. ``hold(adapter_ids)``: a
        context that keeps those adapters on the accelerator (residency.py) for a step.
        ``prefill_tokens``: the most prompt tokens one loop iteration prefills."""
        self._run = run or (lambda fn, *args: fn(*args))
        self._hold = hold or (lambda _ids: contextlib.nullcontext())
        self.context_length = context_length
        self.max_rows = max_rows
        self.window_s = window_s  # when idle, wait this long for company before starting
        self._batch = DecodeBatch(model, tokenizer, eos_ids, device, prefill_tokens)
        self._pending: deque[_Request] = deque()
        self._in_flight: dict[int, _Request] = {}  # requests with live rows, by id()
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # loop iterations run, for stats
        self.cancelled = 0  # requests cancelled by their callers, for stats
        self._arrivals = 0  # requests submitted so far (what _gather_arrivals watches)
        self._thread = threading.Thread(target=self._loop, name="thinker-sampler", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[SampleRow], on_tokens: OnTokens | None = None) -> Future:
        """Queue ``rows``; the future's result is their completions, in order. ``on_tokens``:
        see the module docstring."""
        check_prompts(rows, self.context_length)
        request = _Request(list(rows), Future(), on_tokens, [None] * len(rows), len(rows), sent=[0] * len(rows))
        with self._cond:
            if self._closed:
                raise RuntimeError("the sampling engine is closed")
            self._pending.append(request)
            self._arrivals += 1
            self._cond.notify()
        request.future.add_done_callback(lambda f: self._cancelled(request) if f.cancelled() else None)
        return request.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        rows = len(self._batch) + self._batch.waiting()
        with self._cond:
            waiting = sum(len(r.rows) for r in self._pending)
        return {
            "sampling_rows": rows,
            "sampling_waiting": waiting,
            "sampling_steps": self.steps,
            "sampling_cancelled": self.cancelled,
        }

    def _cancelled(self, request: _Request) -> None:
        """On the canceller's thread, as its ``future.cancel()`` returns."""
        request.cancelled = True
        with self._cond:
            self.cancelled += 1
            with contextlib.suppress(ValueError):  # (not queued: in the batch, it leaves at the next step)
                self._pending.remove(request)

    # ---- the loop --------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(len(self._batch) or self._batch.prefilling)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._busy() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail_everything(RuntimeError("the server shut down before this sample finished"))
                    return
                if not self._busy() and self.window_s > 0:
                    self._gather_arrivals()
                admitted = self._take_admissible()
            try:
                self._run(self._admit_and_step, admitted)
                self.steps += 1
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep the loop alive
                log.exception("sampling step failed")
                self._fail_everything(exc, admitted)
            self._settle()

    def _gather_arrivals(self) -> None:
        """Idle, with a request in: wait until none has come for ``window_s`` (at most
        ``GATHER_WINDOWS`` windows), so requests sent together start as one prefill group
        and decode in step. Over HTTP they arrive spread out (each is parsed and checked
        on a thread of its own): with a fixed window from the first arrival, 32 requests
        sent at once started in several groups, each a prefill of its own and a ragged end
        (docs/sampling.md). Called holding ``_cond``."""
        first = last = time.monotonic()
        while not self._closed and (now := time.monotonic()) < (end := gather_until(first, last, self.window_s)):
            arrived = self._arrivals
            self._cond.wait(end - now)
            if self._arrivals != arrived:
                last = time.monotonic()

    def _admit_and_step(self, admitted: list[_Request]) -> None:
        batch = self._batch
        adapters = {live.row.adapter_id for live in batch.rows}
        adapters.update(live.row.adapter_id for group in batch.prefilling for live in group.rows)
        adapters.update(row.adapter_id for req in admitted for row in req.rows)
        with self._hold(adapters):
            self._enqueue(admitted)
            self._prefill_chunk()
            batch.step()

    def _enqueue(self, requests: Sequence[_Request]) -> None:
        """One prefill group for every request admitted together."""
        rows = []
        for request in requests:
            request.live = self._live_rows(request)
            rows += request.live
        self._batch.enqueue(rows)

    def _prefill_chunk(self) -> None:
        """Prefill chunks, oldest group first, up to the batch's prefill budget of tokens."""
        budget = self._batch.prefill_tokens
        while self._batch.prefilling and budget > 0:
            budget -= max(1, self._prefill_one())

    def _prefill_one(self) -> int:
        """The oldest group's next chunk. If it fails, a group of several requests is split
        into one group per request (started afresh, after the failed pass's memory is
        free), so only the request that cannot be prefilled (too big, say) fails. A
        cancelled request's rows are not retried (it may have left ``_in_flight`` already)."""
        group = self._batch.prefilling[0]
        try:
            return self._batch.prefill_step(group)
        except Exception as exc:  # noqa: BLE001 - the group is out of the queue; the batch is untouched
            owners = self._requests_of(group.rows)
            requests = list({id(r): r for r in owners}.values())
            if len(requests) == 1 and len(owners) == len(group.rows):  # its rows alone: it is the culprit
                log.warning("prefill of a sampling request failed: %s", exc)
                self._fail(requests[0], failures.explain(exc, f"the prefill of {len(requests[0].rows)} prompts"))
                return 0
        # Retried out of the except block: the failed pass's activations are free by now.
        groups = []
        for request in requests:
            if not request.abandoned():
                request.live = self._live_rows(request)
                groups += self._batch.enqueue(request.live, merge=False)
        self._batch.prefilling.rotate(len(groups))  # those groups first, in their order
        return 0

    def _requests_of(self, rows: Sequence[LiveRow]) -> list[_Request]:
        """The requests in flight that ``rows`` belong to (a cancelled one is not, any more)."""
        owner = {id(live): r for r in self._in_flight.values() for live in r.live}
        return [owner[id(live)] for live in rows if id(live) in owner]

    def _take_admissible(self) -> list[_Request]:
        taken, rows = [], len(self._batch) + self._batch.waiting()
        while self._pending:
            request = self._pending[0]
            if rows and rows + len(request.rows) > self.max_rows:
                break
            taken.append(self._pending.popleft())
            rows += len(request.rows)
        self._in_flight.update({id(r): r for r in taken})
        return taken

    def _live_rows(self, request: _Request) -> list[LiveRow]:
        request.completions, request.remaining = [None] * len(request.rows), len(request.rows)
        request.sent = [0] * len(request.rows)

        def done(live: LiveRow, index: int) -> None:
            request.completions[index] = live.completion
            request.remaining -= 1

        def fail(live: LiveRow, exc: BaseException) -> None:
            log.warning("a decode step failed for one of %d samples; failing that request: %s", len(request.rows), exc)
            self._fail(request, failures.explain(exc, _describe(live, request)))

        return [
            self._batch.make_row(
                row,
                self.context_length,
                on_done=lambda live, i=i: done(live, i),
                on_fail=fail,
                abandoned=request.abandoned,  # its rows stop decoding once it failed or was cancelled
            )
            for i, row in enumerate(request.rows)
        ]

    def _settle(self) -> None:
        """On the loop's thread, after a step: stream each request's new tokens, then
        complete the requests that are done or failed."""
        for key, request in list(self._in_flight.items()):
            if request.future.cancelled():
                del self._in_flight[key]  # (its rows leave the batch at the next step)
                continue
            if request.on_tokens is not None and not request.failed():
                self._stream(request)
            if request.failed():
                del self._in_flight[key]
                _complete(request.future, error=request.error)
            elif request.remaining == 0:
                del self._in_flight[key]
                _complete(request.future, result=request.completions)

    def _stream(self, request: _Request) -> None:
        for i, live in enumerate(request.live):
            if request.future.cancelled():
                return
            tokens = live.completion.tokens
            if len(tokens) > request.sent[i]:
                start, request.sent[i] = request.sent[i], len(tokens)
                try:
                    request.on_tokens(i, tokens[start:], live.completion.logprobs[start:])
                except Exception as exc:  # noqa: BLE001 - the callback's failure is its request's
                    log.warning("a sampling request's token callback failed; failing that request: %s", exc)
                    self._fail(request, exc)
                    return

    def _fail(self, request: _Request, error: BaseException) -> None:
        if request.error is None:
            request.error = error

    def _fail_everything(self, error: BaseException, admitted: Sequence[_Request] = ()) -> None:
        self._batch.clear()
        requests = list(self._in_flight.values()) + list(admitted)
        if self._closed:
            requests += list(self._pending)
            self._pending.clear()
        for request in requests:
            self._fail(request, error)
            _complete(request.future, error=request.error)
        self._in_flight.clear()


def _complete(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set ``future``'s outcome unless its caller cancelled it. (set_running_or_notify_cancel
    decides atomically: once it returns True, cancel() can no longer succeed, so set_result
    cannot meet a cancelled future.)"""
    if future.done() or not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def gather_until(first: float, last: float, window_s: float) -> float:
    """When an idle loop that got a request at ``first`` and the latest at ``last`` stops
    waiting for more: a window after the latest, at most ``GATHER_WINDOWS`` after the first."""
    return min(last + window_s, first + GATHER_WINDOWS * window_s)


def _describe(live: LiveRow, request: _Request) -> str:
    """The size of the sample a decode step failed on, in terms its sender controls."""
    prompt, generated = len(live.row.prompt_tokens), len(live.completion.tokens)
    return (
        f"a decode step of one of {len(request.rows)} samples, at {prompt + generated} tokens of context "
        f"({prompt} prompt + {generated} generated; max_tokens {live.row.params.max_tokens})"
    )
