"""Where torch runs: one dedicated compute thread on CPU, the calling thread elsewhere.

On a CPU, libgomp (PyTorch's OpenMP) gives every thread that runs torch ops its own team
of helper threads. Once more such threads exist than cores, it switches to "throttled"
spinning and every op pays for sleeping and waking its helpers: measured here on 2 cores,
the same work ran ~1.8x slower as soon as a second worker thread had touched torch. So on
CPU every model computation (training passes, optimizer steps, decode steps) is handed to
one thread and runs at full speed; jobs still interleave fairly in submission order, and
fused passes are where the throughput comes from. On a GPU the threads only queue kernels,
so jobs run on the worker threads themselves.

How many threads torch's own parallel ops use is chosen here too (``TORCH_THREADS``,
``ThreadPlan``): on a machine shared with other busy processes, a team of OpenMP threads
waits at every op's barrier for its slowest member, and members that spin while they wait
take the cores everyone needs; docs/threads.md has the measurements behind the default.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadPlan:
    """How torch runs on this process's CPUs: ``intra_op`` threads per op, ``inter_op``
    threads for parallel graph branches, and ``why`` (the setting and what it resolved from)."""

    intra_op: int
    inter_op: int
    cpus: tuple[int, ...]  # the CPUs this process may run on
    why: str

    def describe(self) -> str:
        wait = os.environ.get("OMP_WAIT_POLICY", "unset")
        return (
            f"Torch threads: {self.intra_op} intra-op, {self.inter_op} inter-op, OMP_WAIT_POLICY={wait}, "
            f"CPUs {_cpu_list(self.cpus)} ({self.why})"
        )

    def apply(self) -> None:
        """Make the calling thread (and threads that start torch work later) use this plan.

        OpenMP keeps the thread count per thread: ``torch.set_num_threads`` sets it for the
        caller and as the default for threads that have not run a parallel op yet, so the
        compute thread calls this itself, first thing."""
        import torch

        torch.set_num_threads(self.intra_op)
        if torch.get_num_interop_threads() != self.inter_op:
            try:
                torch.set_num_interop_threads(self.inter_op)
            except RuntimeError:  # set once per process, before any inter-op work: keep what is there
                pass


def plan_threads(
    setting: str, environ: Mapping[str, str] | None = None, cpus: tuple[int, ...] | None = None
) -> ThreadPlan:
    """Resolve ``TORCH_THREADS`` (``"auto"`` or a whole number >= 1, validated by Config).

    auto: ``OMP_NUM_THREADS`` when it is set (the standard knob wins); else every CPU this
    process may use when OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE``, which the server
    sets before torch loads); else half of them, at least 1. A team of OpenMP threads is as
    fast as its slowest member: threads that spin while they wait take the core a busy
    neighbour needs, and on a shared 2-core machine 2 spinning threads made every op 10x
    slower or worse; 2 passive ones were the fastest setting, quiet and busy (docs/threads.md)."""
    environ = os.environ if environ is None else environ
    cpus = cpus if cpus is not None else _usable_cpus()
    if setting.strip().lower() != "auto":
        return ThreadPlan(int(setting), 1, cpus, f"TORCH_THREADS={int(setting)}")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadPlan(int(omp), 1, cpus, f"TORCH_THREADS=auto: OMP_NUM_THREADS={int(omp)}")
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return ThreadPlan(len(cpus), 1, cpus, f"TORCH_THREADS=auto: all {len(cpus)} CPUs, OpenMP waits passively")
    threads = max(1, len(cpus) // 2)
    return ThreadPlan(
        threads, 1, cpus, f"TORCH_THREADS=auto: half of {len(cpus)} CPUs, at least 1, as OpenMP threads spin"
    )


def _usable_cpus() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # (not Linux)
        return tuple(range(os.cpu_count() or 1))


def _cpu_list(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


class InlineRunner:
    """Runs each computation on the calling thread."""

    def __init__(self, plan: ThreadPlan | None = None) -> None:
        self.plan = plan
        if plan is not None:
            plan.apply()  # the default for every worker thread that has not run torch yet

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def close(self) -> None:
        pass


class ComputeThread:
    """Runs each computation on one dedicated thread, in arrival order."""

    def __init__(self, name: str = "thinker-compute", plan: ThreadPlan | None = None) -> None:
        """``plan``: torch's threads on this thread (None: leave torch's own choice)."""
        self.plan = plan
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(*args)  # already there (a computation calling another)
        done: Future = Future()
        # In the caller's context: log records made there keep its request and adapter ids.
        self._queue.put((contextvars.copy_context().run, (fn, *args), done))
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        if self.plan is not None:
            self.plan.apply()  # before this thread's first op creates its OpenMP team
        while (item := self._queue.get()) is not None:
            fn, args, done = item
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.set_exception(exc)
