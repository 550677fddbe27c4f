"""Continuous batching for sampling: one decode loop shared by every sampling request.

Requests (from any adapters, or the base model) join the running batch at the next
decode step instead of waiting for it to drain; each keeps its own adapter, sampling
parameters and seed, and its future completes as soon as its own rows are done.
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
from backend.sample.decode import DecodeBatch, LiveRow
from backend.sample.sampling import Completion, SampleRow, check_prompts

log = logging.getLogger("thinker.sampling")


@dataclass
class _Request:
    rows: list[SampleRow]
    future: Future
    completions: list[Completion | None] = field(default_factory=list)
    remaining: int = 0
    # on_tokens(row_index, tokens, logprobs): each row's new tokens after every decode step
    on_tokens: Callable[[int, list[int], list[float]], None] | None = None
    lives: list[LiveRow] = field(default_factory=list)  # its rows in the batch, by row index
    sent: list[int] = field(default_factory=list)  # tokens of each row already passed to on_tokens


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
    ) -> None:
        """``run(fn, *args)`` executes model work where the backend wants it (its compute
        thread on CPU); by default, on this engine's own thread. ``hold(adapter_ids)``: a
        context that keeps those adapters on the accelerator (residency.py) for a step."""
        self._run = run or (lambda fn, *args: fn(*args))
        self._hold = hold or (lambda _ids: contextlib.nullcontext())
        self.context_length = context_length
        self.max_rows = max_rows
        self.window_s = window_s  # when idle, wait this long for company before starting
        self._batch = DecodeBatch(model, tokenizer, eos_ids, device)
        self._pending: deque[_Request] = deque()
        self._in_flight: dict[int, _Request] = {}  # requests with live rows, by id()
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run, for stats
        self._thread = threading.Thread(target=self._loop, name="thinker-sampler", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[SampleRow], on_tokens=None) -> Future:
        """Queue ``rows``; the future's result is their completions, in order.
        ``on_tokens(row_index, tokens, logprobs)``, if given, hears each row's new tokens
        after every decode step (a row's last ones before the future completes)."""
        check_prompts(rows, self.context_length)
        request = _Request(list(rows), Future(), [None] * len(rows), len(rows), on_tokens)
        with self._cond:
            if self._closed:
                raise RuntimeError("the sampling engine is closed")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        return {"sampling_rows": len(self._batch), "sampling_waiting": len(self._pending)}

    # ---- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not len(self._batch) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail_everything(RuntimeError("the server shut down before this sample finished"))
                    return
                if not len(self._batch) and self.window_s > 0:
                    # Idle: give requests sent at about the same time a moment to arrive.
                    deadline = time.monotonic() + self.window_s
                    while (left := deadline - time.monotonic()) > 0 and not self._closed:
                        self._cond.wait(left)
                admitted = self._take_admissible()
            try:
                self._run(self._admit_and_step, admitted)
                self.steps += 1
                for request in list(self._in_flight.values()):
                    for index in range(len(request.lives)):
                        self._flush(request, index)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep the loop alive
                log.exception("sampling step failed")
                self._fail_everything(exc, admitted)

    def _admit_and_step(self, admitted: list[_Request]) -> None:
        adapters = {live.row.adapter_id for live in self._batch.rows}
        adapters.update(row.adapter_id for req in admitted for row in req.rows)
        with self._hold(adapters):
            self._admit(admitted)
            self._batch.step()

    def _admit(self, requests: Sequence[_Request]) -> None:
        """Prefill ``requests`` together; if that fails, each on its own, so only the one
        that cannot be prefilled (too big for memory, say) fails."""
        try:
            self._batch.admit([row for req in requests for row in self._live_rows(req)])
            return
        except Exception as exc:  # noqa: BLE001 - the newcomers' prefill: the batch is untouched
            if len(requests) == 1:
                log.warning("prefill of a sampling request failed: %s", exc)
                rows = len(requests[0].rows)
                self._fail_requests(requests, failures.explain(exc, f"the prefill of {rows} prompts"))
                return
        # Retried out of the except block: the failed pass's activations are free by now.
        for request in requests:
            if not request.future.done():  # (all its rows may have finished in the prefill)
                request.completions, request.remaining = [None] * len(request.rows), len(request.rows)
                self._admit([request])

    def _take_admissible(self) -> list[_Request]:
        taken, rows = [], len(self._batch)
        while self._pending:
            request = self._pending[0]
            if rows and rows + len(request.rows) > self.max_rows:
                break
            taken.append(self._pending.popleft())
            rows += len(request.rows)
        self._in_flight.update({id(r): r for r in taken})
        return taken

    def _flush(self, request: _Request, index: int) -> None:
        """Pass row ``index``'s tokens not yet passed on to the request's ``on_tokens``."""
        if request.on_tokens is None or request.future.done():
            return
        completion = request.lives[index].completion
        start = request.sent[index]
        if len(completion.tokens) > start:
            request.sent[index] = len(completion.tokens)
            try:
                request.on_tokens(index, completion.tokens[start:], completion.logprobs[start:])
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the decode loop
                log.exception("on_tokens failed")

    def _live_rows(self, request: _Request) -> list[LiveRow]:
        def done(live: LiveRow, index: int) -> None:
            if request.future.done():
                return  # another of its rows failed: the request already has its answer
            self._flush(request, index)
            request.completions[index] = live.completion
            request.remaining -= 1
            if request.remaining == 0:
                self._in_flight.pop(id(request), None)
                request.future.set_result(request.completions)

        def fail(live: LiveRow, exc: BaseException) -> None:
            log.warning("a decode step failed for one of %d samples; failing that request: %s", len(request.rows), exc)
            self._fail_requests([request], failures.explain(exc, _describe(live, request)))

        request.lives = [
            self._batch.make_row(
                row,
                self.context_length,
                on_done=lambda live, i=i: done(live, i),
                on_fail=fail,
                abandoned=request.future.done,  # its other rows stop decoding once it has failed
            )
            for i, row in enumerate(request.rows)
        ]
        request.sent = [0] * len(request.rows)
        return request.lives

    def _fail_requests(self, requests: Sequence[_Request], error: BaseException) -> None:
        for request in requests:
            self._in_flight.pop(id(request), None)
            if not request.future.done():
                request.future.set_exception(error)

    def _fail_everything(self, error: BaseException, admitted: Sequence[_Request] = ()) -> None:
        self._batch.clear()
        requests = list(self._in_flight.values()) + list(admitted)
        if self._closed:
            requests += list(self._pending)
            self._pending.clear()
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self._in_flight.clear()


def _describe(live: LiveRow, request: _Request) -> str:
    """The size of the sample a decode step failed on, in terms its sender controls."""
    prompt, generated = len(live.row.prompt_tokens), len(live.completion.tokens)
    return (
        f"a decode step of one of {len(request.rows)} samples, at {prompt + generated} tokens of context "
        f"({prompt} prompt + {generated} generated; max_tokens {live.row.params.max_tokens})"
    )
