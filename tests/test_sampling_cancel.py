"""Cancelling a sampling request (``future.cancel()`` on what ``submit`` returned): a queued
one never runs, a running one's rows leave the decode loop at the next step, and the other
requests get exactly the tokens they get without it.

The loop is paused at chosen points by a gate in its ``run`` hook, so what the test sees
(queued, admitted, decoding) is set up by events, not by timing.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future

import pytest
import torch

from backend.sample.decode import PREFILL_TOKENS
from backend.sample.engine import SamplingEngine
from backend.sample.sampling import SampleRow, SamplingParams
from tests.test_decode_faults import failing_when

pytestmark = pytest.mark.unit

LONG = 400  # a cancelled request's max_tokens: far more steps than the tests' others need
WAIT_S = 120  # a deadline for waits on the loop, never reached when things work


class Gate:
    """The engine's ``run``: runs each loop step, unless closed; closed, the loop waits
    before its next step (``wait_held`` returns) until ``allow(n)`` lets n more steps
    through or ``open()`` all of them."""

    def __init__(self, run) -> None:
        self._run = run
        self._cond = threading.Condition()
        self._left: int | None = None  # steps it may still run; None: any number
        self._held = False

    def close(self) -> None:
        with self._cond:
            self._left = 0

    def open(self) -> None:
        with self._cond:
            self._left, self._held = None, False
            self._cond.notify_all()

    def allow(self, steps: int) -> None:
        with self._cond:
            self._left, self._held = (self._left or 0) + steps, False
            self._cond.notify_all()

    def wait_held(self) -> bool:
        """Until the loop waits at the gate (False past the deadline)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held, WAIT_S)

    def __call__(self, fn, *args):
        with self._cond:
            while self._left == 0:
                self._held = True
                self._cond.notify_all()
                self._cond.wait()
            if self._left is not None:
                self._left -= 1
        return self._run(fn, *args)


@pytest.fixture
def gate(backend) -> Gate:
    return Gate(backend.compute.run)


def make_engine(backend, gate: Gate, max_rows: int = 64, prefill_tokens: int = PREFILL_TOKENS) -> SamplingEngine:
    return SamplingEngine(
        backend.model, backend.tokenizer, backend.eos_ids, backend.loaded.context_length, backend.device,
        max_rows=max_rows, window_s=0.0, run=gate, hold=backend.residency.using, prefill_tokens=prefill_tokens,
    )


@pytest.fixture
def engine(backend, gate):
    engine = make_engine(backend, gate)
    yield engine
    gate.open()
    engine.close()


def rows(backend, texts: list[str], max_tokens: int, seed: int) -> list[SampleRow]:
    """Sampled rows (temperature 1, seeded) that run to max_tokens."""
    prompts = backend.render_prompts(texts)
    return [
        SampleRow(None, p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i, stop_at_eos=False))
        for i, p in enumerate(prompts)
    ]


def wait_until_idle(engine: SamplingEngine) -> None:
    deadline = time.monotonic() + WAIT_S
    while engine.stats()["sampling_rows"] and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the batch to empty, not ordering events
    assert engine.stats()["sampling_rows"] == 0


def test_a_cancelled_queued_request_never_runs(backend, gate):
    engine = make_engine(backend, gate, max_rows=1)  # one row at a time: the second request queues
    try:
        gate.close()
        first = engine.submit(rows(backend, ["Hi"], 8, seed=1))
        assert gate.wait_held()  # the loop took the first request and waits before its step
        heard: list[int] = []
        queued = engine.submit(rows(backend, ["Hello there"], LONG, seed=2), on_tokens=lambda i, t, lp: heard.append(i))
        assert engine.stats()["sampling_waiting"] == 1
        assert queued.cancel()
        assert engine.stats()["sampling_waiting"] == 0  # out of the queue at once
        gate.open()
        assert len(first.result(timeout=WAIT_S)[0].tokens) == 8
        wait_until_idle(engine)
        assert heard == []
        assert queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        assert engine.steps < LONG
        assert engine.stats()["sampling_cancelled"] == 1
    finally:
        gate.open()
        engine.close()


def test_a_request_cancelled_before_its_prefill_is_never_prefilled(backend, engine, gate):
    """Taken from the queue but not yet prefilled: its prefill group is skipped."""
    gate.close()
    heard: list[int] = []
    doomed = engine.submit(rows(backend, ["Hello there"] * 2, LONG, seed=3), on_tokens=lambda i, t, lp: heard.append(i))
    assert gate.wait_held()  # the loop admitted it and waits before the step that prefills it
    assert doomed.cancel()
    gate.open()
    other = engine.submit(rows(backend, ["Hi"], 8, seed=4))
    assert len(other.result(timeout=WAIT_S)[0].tokens) == 8
    wait_until_idle(engine)
    assert heard == []
    assert engine.steps < LONG


def test_a_running_request_leaves_at_the_next_step_and_the_others_tokens_do_not_change(backend, engine, gate):
    others = rows(backend, ["Hi", "Tell me a story"], 24, seed=10)
    alone = [c.tokens for c in engine.submit(others).result(timeout=WAIT_S)]
    steps_alone = engine.steps

    heard = {"calls": 0}

    def on_tokens(row: int, tokens: list[int], logprobs: list[float]) -> None:
        heard["calls"] += 1
        if heard["calls"] == 4:  # a few steps in: pause the loop before its next step
            gate.close()

    together = engine.submit(others)
    doomed = engine.submit(rows(backend, ["Hello there", "Hi"], LONG, seed=20), on_tokens=on_tokens)
    assert gate.wait_held()
    assert engine.stats()["sampling_rows"] == 4  # everyone still decoding
    assert doomed.cancel()
    calls_at_cancel, steps_at_cancel = heard["calls"], engine.steps
    gate.open()

    assert [c.tokens for c in together.result(timeout=WAIT_S)] == alone
    wait_until_idle(engine)
    assert heard["calls"] == calls_at_cancel  # not a token more for it
    # Its rows went on for none of their LONG tokens: the loop ran only for the others.
    assert engine.steps - steps_at_cancel <= steps_alone
    assert not together.cancel()  # a finished request: nothing to cancel
    with pytest.raises(CancelledError):
        doomed.result(timeout=0)


def test_a_request_cancelled_from_its_own_token_callback_stops_there(backend, engine):
    """The callback runs on the loop's thread; cancelling there is allowed."""
    heard: list[int] = []
    box: dict = {}
    cancelled = threading.Event()

    def on_tokens(row: int, tokens: list[int], logprobs: list[float]) -> None:
        heard.append(len(tokens))
        if len(heard) == 3:
            assert box["future"].cancel()
            cancelled.set()

    box["future"] = engine.submit(rows(backend, ["Hi"], LONG, seed=30), on_tokens=on_tokens)
    assert cancelled.wait(WAIT_S)
    wait_until_idle(engine)
    assert len(heard) == 3
    assert engine.steps < LONG


def test_the_cluster_facades_futures_take_a_cancel_quietly():
    """EXECUTOR=ray: the facade's future is its own; cancelled, the worker's answer is
    dropped instead of raising InvalidStateError on the facade's thread."""
    from backend.cluster.facade import _settle

    cancelled = Future()
    assert cancelled.cancel()
    _settle(cancelled, lambda: ["completions"])  # must not raise
    assert cancelled.cancelled()

    answered, failed = Future(), Future()
    _settle(answered, lambda: ["completions"])
    _settle(failed, lambda: 1 / 0)
    assert answered.result(timeout=0) == ["completions"]
    assert isinstance(failed.exception(timeout=0), ZeroDivisionError)


def test_a_prefill_failing_after_a_cancel_retries_the_requests_still_wanted(backend, gate):
    """A prefill group shared with a cancelled request (gone from the engine's books after
    a step) fails: the request still wanted is retried alone and gets its own tokens."""
    engine = make_engine(backend, gate, prefill_tokens=8)  # a 3-row group prefills 2 columns a step
    try:
        wanted = rows(backend, ["Tell me a long story about the sea"], 12, seed=40)
        expected = [c.tokens for c in engine.submit(wanted).result(timeout=WAIT_S)]
        gate.close()
        engine.submit([SampleRow(None, [72, 105], SamplingParams(max_tokens=1, temperature=0))])
        assert gate.wait_held()  # the loop took that one; the next two queue behind it
        sky = ["Tell me a long story about the sky", "Tell me a long story about the stars"]  # distinct: 2 rows
        doomed = engine.submit(rows(backend, sky, LONG, seed=50))
        kept = engine.submit(wanted)
        gate.allow(1)
        assert gate.wait_held()  # it took both: one prefill group of 3 rows
        gate.allow(1)
        assert gate.wait_held()  # the group's first chunk ran
        assert doomed.cancel()
        gate.allow(1)
        assert gate.wait_held()  # a chunk more, and the cancelled request left the engine's books
        three_row_chunk = lambda ids_BL, mask_BL: ids_BL.shape[0] == 3 and ids_BL.shape[1] > 1  # noqa: E731
        with failing_when(backend, three_row_chunk, torch.OutOfMemoryError("out of memory")) as seen:
            gate.open()
            assert [c.tokens for c in kept.result(timeout=WAIT_S)] == expected
        assert seen["failed"] == 1
        wait_until_idle(engine)
        assert engine.steps < LONG  # the cancelled rows were not retried
    finally:
        gate.open()
        engine.close()
