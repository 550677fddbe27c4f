"""Torch's intra-op thread count on CPU, following what other processes leave free.

A team of OpenMP threads meets at a barrier after every op, so it runs at the pace of its
slowest member. On a quiet machine a team of every core, waiting for the next op with
libgomp's short spin, is the fastest (SmolLM2-135M, 32 rows x 64 tokens on 2 cores: 2 threads
8.4 s, 1 thread 11.4 s). Once another process keeps a core busy, the member that shares that
core holds everyone up at each barrier and the same team collapses (33.3 s), while one thread
keeps its speed (11.3 s). No fixed setting is right for both (docs/threads.md), so the
compute thread picks the team size itself.

How it tells: the kernel's count of runnable threads, machine-wide (``procs_running`` in
/proc/stat), read on the compute thread between jobs and before each decoder layer's
forward (``watch``). At that moment our own team is runnable too (this thread, and its
helpers spinning on their short wait), so the others' demand is the count minus our team
size. The team gets the usable CPUs they leave free, at least 1. Readings are at least
``interval_s`` apart, and the two mistakes cost differently: a full team beside a busy
neighbour runs ~4x slower, one thread on a quiet machine ~1.5x. So three readings in a row
that show a neighbour shrink the team (within ~60 ms of a decode or a forward pass), while
growing back waits for the median of the last few: a short-lived process, or one of our
HTTP threads parsing a request, does not flip it. Backward passes take no readings (a
training job adapts at its next forward). A reading costs ~20 us; a change of team size is
a ``torch.set_num_threads`` on the compute thread, where OpenMP keeps it.

Without /proc/stat (not Linux) the team stays at the plan's size.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("thinker.threads")

STAT = "/proc/stat"
SHRINK_AFTER = 3  # readings in a row that show a neighbour (2 let a kernel thread's blips flip it)


def read_procs_running(path: str = STAT) -> int | None:
    """Runnable threads on the machine now (the reader among them), or None if unknown."""
    try:
        with open(path, "rb") as stat:
            for line in stat:
                if line.startswith(b"procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def free_threads(others: float, usable: int, online: int) -> int:
    """The team size that leaves other processes their CPUs: of the ``online`` CPUs the
    kernel schedules on, ``others`` runnable threads not ours hold as many; ours may run on
    ``usable`` of them. At least 1."""
    return max(1, min(usable, online - int(round(others))))


class AdaptiveThreads:
    """Sizes the calling thread's OpenMP team between 1 and ``usable`` CPUs; call ``tick()``
    on the compute thread before each job (see the module docstring)."""

    def __init__(
        self,
        usable: int,
        online: int,
        set_threads: Callable[[int], None],
        read: Callable[[], int | None] = read_procs_running,
        window: int = 5,
        interval_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.usable, self.online = usable, max(online, usable)
        self.threads = usable  # the team size now (set by the plan before the first job)
        self.changes = 0  # how often it changed, for stats
        self._set, self._read, self._clock = set_threads, read, clock
        self._others: deque[int] = deque(maxlen=window)
        self._interval_s = interval_s
        self._last = float("-inf")
        self._enabled = usable > 1 and read() is not None
        self._owner = threading.get_ident()  # OpenMP's count is per thread: only this one's

    def watch(self, model: torch.nn.Module) -> None:
        """Also take readings inside forward passes, before each decoder layer (the modules
        of the model's longest ModuleList), so a long job adapts while it runs."""
        from torch import nn

        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        if self._enabled and stacks:
            for layer in max(stacks, key=len):
                layer.register_forward_pre_hook(self._on_layer)

    def _on_layer(self, _module, _args) -> None:
        if threading.get_ident() == self._owner:
            self.tick()

    def tick(self) -> int:
        """Take a reading if the last is old enough; resize the team if the recent readings
        say so. Returns the team size."""
        if not self._enabled:
            return self.threads
        now = self._clock()
        if now - self._last < self._interval_s:
            return self.threads
        self._last = now
        running = self._read()
        if running is None:
            return self.threads
        self._others.append(max(0, running - self.threads))  # ours: this thread and its team
        recent = list(self._others)[-SHRINK_AFTER:]
        want = free_threads(min(recent), self.usable, self.online)  # the recent readings agree: shrink now
        if want >= self.threads:  # growing waits for most of the window
            want = max(self.threads, free_threads(statistics.median_low(self._others), self.usable, self.online))
        if want != self.threads:
            log.debug("torch threads %d -> %d (other runnable threads: %s)", self.threads, want, list(self._others))
            self._set(want)
            self.threads = want
            self.changes += 1
        return self.threads
