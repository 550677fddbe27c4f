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

from backend.sample.engine import SamplingEngine
from backend.sample.sampling import SampleRow, SamplingParams

pytestmark = pytest.mark.unit

LONG = 400  # a cancelled request's max_tokens: far more steps than the tests' others need
WAIT_S = 120  # a deadline for waits on the loop, never reached when things work


class Gate:
    """The engine's ``run``: runs each loop step, unless closed; then the loop waits before
    its next step (``held`` is set) until ``open()``."""

    def __init__(self, run) -> None:
        self._run = run
        self._open = threading.Event()
        self._open.set()
        self.held = threading.Event()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self.held.clear()
        self._open.set()

    def __call__(self, fn, *args):
        if not self._open.is_set():
            self.held.set()
            self._open.wait()
        return self._run(fn, *args)


@pytest.fixture
def gate(backend) -> Gate:
    return Gate(backend.compute.run)


def make_engine(backend, gate: Gate, max_rows: int = 64) -> SamplingEngine:
    return SamplingEngine(
        backend.model, backend.tokenizer, backend.eos_ids, backend.loaded.context_length, backend.device,
        max_rows=max_rows, window_s=0.0, run=gate, hold=backend.residency.using,
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
        assert gate.held.wait(WAIT_S)  # the loop took the first request and waits before its step
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
    assert gate.held.wait(WAIT_S)  # the loop admitted it and waits before the step that prefills it
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
    assert gate.held.wait(WAIT_S)
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
