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
``ThreadPlan``): a team of OpenMP threads waits at every op's barrier for its slowest
member, so on a machine where other processes keep cores busy a team of every core
collapses, while on a quiet one it is the fastest. By default the compute thread resizes
its team before each job to the CPUs other processes leave free (thread_tuner.py);
docs/threads.md has the measurements behind that default.
"""

from __future__ import annotations

import contextvars
import math
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backend.thread_tuner import AdaptiveThreads
from thinker.core.errors import ConfigurationError

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadPlan:
    """How torch runs on this process's CPUs: ``intra_op`` threads per op, ``inter_op``
    threads for parallel graph branches, and ``why`` (the setting and what it resolved from)."""

    intra_op: int  # the most; with ``adaptive``, the team shrinks to what others leave free
    inter_op: int
    cpus: tuple[int, ...]  # the CPUs this process may run on
    why: str
    adaptive: bool = False  # resized before each job on the compute thread (thread_tuner.py)
    pinned: bool = False  # the compute thread (and the team it starts) runs on ``cpus`` only

    def describe(self) -> str:
        wait = os.environ.get("OMP_WAIT_POLICY", "unset")
        threads = f"1-{self.intra_op}" if self.adaptive and self.intra_op > 1 else str(self.intra_op)
        where = f"CPUs {_cpu_list(self.cpus)}" + (" pinned (COMPUTE_CPUS)" if self.pinned else "")
        return (
            f"Torch threads: {threads} intra-op, {self.inter_op} inter-op, OMP_WAIT_POLICY={wait}, "
            f"{where} ({self.why})"
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
    setting: str,
    environ: Mapping[str, str] | None = None,
    cpus: tuple[int, ...] | None = None,
    pin: tuple[int, ...] = (),
    cpu_limit: float | None = None,
) -> ThreadPlan:
    """Resolve ``TORCH_THREADS`` (``"auto"`` or a whole number >= 1, validated by Config).

    auto: ``OMP_NUM_THREADS`` when it is set (the standard knob wins); else adaptive: up to
    every CPU this process may use, fewer while other processes keep CPUs busy (see
    thread_tuner.py; measured in docs/threads.md). A number: exactly that many, always.
    ``pin`` (``COMPUTE_CPUS``): the CPUs the compute thread is pinned to, which must be among
    those the process may use; empty, it is not pinned (the default, measured in threads.md).
    ``cpu_limit``: the process's CPU quota (``cgroup_cpu_limit()``, a container's ``--cpus``):
    auto's team never exceeds it, where 64 visible CPUs may come with a quota of 2."""
    environ = os.environ if environ is None else environ
    cpus = cpus if cpus is not None else _usable_cpus()
    if pin:
        if not set(pin) <= set(cpus):
            raise ConfigurationError(
                f"COMPUTE_CPUS={_cpu_list(pin)} names CPUs this process may not use (it may use {_cpu_list(cpus)})"
            )
        cpus = tuple(sorted(set(pin)))
    pinned = bool(pin)
    if setting.strip().lower() != "auto":
        return ThreadPlan(int(setting), 1, cpus, f"TORCH_THREADS={int(setting)}", pinned=pinned)
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadPlan(int(omp), 1, cpus, f"TORCH_THREADS=auto: OMP_NUM_THREADS={int(omp)}", pinned=pinned)
    if cpu_limit is not None and cpu_limit < len(cpus):
        team = max(1, math.ceil(cpu_limit))
        why = f"TORCH_THREADS=auto: up to {team} of {len(cpus)} CPUs (a CPU quota of {cpu_limit:g})"
    else:
        team, why = len(cpus), f"TORCH_THREADS=auto: up to all {len(cpus)} CPUs"
    return ThreadPlan(team, 1, cpus, f"{why}, fewer while other processes use them", adaptive=True, pinned=pinned)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", cgroup_file: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time this process's cgroup may use (quota / period), or None if
    unlimited or unknown. cgroup v2: ``cpu.max`` ("200000 100000", or "max 100000") of the
    process's group; v1: ``cpu/cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``."""
    try:
        lines = Path(cgroup_file).read_text().splitlines()
    except OSError:
        lines = []
    groups = dict(line.split(":", 2)[1:] for line in lines if line.count(":") >= 2)  # controller -> path
    candidates = [(f"{root}{groups.get('', '/').rstrip('/')}/cpu.max", None), (f"{root}/cpu.max", None)]
    v1 = f"{root}/cpu{groups.get('cpu', '/').rstrip('/')}" if "cpu" in groups else f"{root}/cpu"
    candidates.append((f"{v1}/cpu.cfs_quota_us", f"{v1}/cpu.cfs_period_us"))
    for quota_path, period_path in candidates:
        try:
            if period_path is None:
                quota, period = Path(quota_path).read_text().split()[:2]
            else:
                quota, period = Path(quota_path).read_text().strip(), Path(period_path).read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
        except ValueError:
            return None
    return None


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
        self.tuner: AdaptiveThreads | None = None  # made on the thread, with an adaptive plan
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
            if self.plan.pinned:  # this thread only; the OpenMP helpers it starts inherit it
                os.sched_setaffinity(0, self.plan.cpus)
            self.plan.apply()  # before this thread's first op creates its OpenMP team
            if self.plan.adaptive:
                self.tuner = self._make_tuner(self.plan)
        while (item := self._queue.get()) is not None:
            fn, args, done = item
            if self.tuner is not None:
                self.tuner.tick()  # between jobs: this thread's team is what torch reads
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.set_exception(exc)

    def _make_tuner(self, plan: ThreadPlan) -> AdaptiveThreads:
        import torch

        return AdaptiveThreads(plan.intra_op, os.cpu_count() or plan.intra_op, torch.set_num_threads)

    def threads_now(self) -> int | None:
        """The compute thread's intra-op team size as of its last job (None: not adaptive)."""
        return self.tuner.threads if self.tuner is not None else None
