"""The adaptive torch thread count (TORCH_THREADS=auto): readings of the machine's runnable
threads decide the compute thread's team size, through the median of recent readings."""

from __future__ import annotations

import threading

import pytest
import torch

from backend.compute_thread import ComputeThread, ThreadPlan
from backend.thread_tuner import AdaptiveThreads, free_threads, read_procs_running

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every tick is past the interval
        return self.now


def tuner_reading(readings: list[int], usable: int = 2, online: int = 2) -> tuple[AdaptiveThreads, list[int]]:
    """A tuner fed ``readings`` (procs_running, one per tick); returns it and the team sizes it set."""
    feed, sizes = iter(readings), []
    tuner = AdaptiveThreads(usable, online, sizes.append, read=lambda: next(feed, 1), clock=Clock())
    return tuner, sizes


@pytest.mark.parametrize(
    ("others", "usable", "online", "want"),
    [(0, 2, 2, 2), (1, 2, 2, 1), (2, 2, 2, 1), (5, 2, 2, 1), (4, 8, 16, 8), (12, 8, 16, 4), (1.4, 4, 4, 3)],
)
def test_the_team_gets_the_cpus_others_leave_free(others, usable, online, want):
    assert free_threads(others, usable, online) == want


def test_a_busy_neighbour_shrinks_the_team_at_once_and_its_leaving_grows_it_back():
    # At 2 threads our own team counts 2; a neighbour makes it 3. At 1 thread: 1, or 2 with it.
    quiet_at_2, busy_at_2, busy_at_1, quiet_at_1 = [2] * 5, [3] * 3, [2] * 6, [1] * 3
    tuner, sizes = tuner_reading([0, *quiet_at_2, *busy_at_2, *busy_at_1, *quiet_at_1])  # (the 0: the probe)
    seen = [tuner.tick() for _ in range(5 + 3 + 6 + 3)]
    assert seen[:5] == [2] * 5
    assert seen[5:8] == [2, 2, 1]  # three busy readings in a row shrink the team
    assert seen[8:14] == [1] * 6  # a neighbour still there: ours is 1 thread, theirs 1 CPU
    assert seen[14:] == [1, 1, 2]  # gone: back to every CPU once most recent readings are quiet
    assert sizes == [1, 2] and tuner.changes == 2


def test_one_odd_reading_does_not_flip_the_team():
    tuner, sizes = tuner_reading([0, 2, 2, 5, 5, 2, 2, 2])  # (two odd ones in a row, even)
    assert [tuner.tick() for _ in range(7)] == [2] * 7
    assert sizes == []


def test_readings_closer_than_the_interval_are_skipped():
    reads = []
    times = iter([0.0, 0.005, 0.01, 0.05])
    tuner = AdaptiveThreads(2, 2, lambda n: None, read=lambda: reads.append(1) or 3, interval_s=0.02,
                            clock=lambda: next(times))
    reads.clear()  # the probe at construction
    for _ in range(4):
        tuner.tick()
    assert len(reads) == 2  # at 0.0 and 0.05


@pytest.mark.parametrize(("usable", "reading"), [(1, 5), (2, None)])
def test_nothing_to_adapt_with_one_cpu_or_no_readings(usable, reading):
    sizes = []
    tuner = AdaptiveThreads(usable, 2, sizes.append, read=lambda: reading, clock=Clock())
    assert [tuner.tick() for _ in range(6)] == [usable] * 6 and sizes == []


def test_procs_running_is_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nctxt 99\nprocs_running 7\nprocs_blocked 0\n")
    assert read_procs_running(str(stat)) == 7
    assert read_procs_running(str(tmp_path / "missing")) is None
    assert (read_procs_running() or 1) >= 1  # this machine's, where there is one: this thread runs


class ScriptedCompute(ComputeThread):
    """The real compute thread, its tuner reading a script instead of /proc/stat."""

    def __init__(self, readings: list[int], plan: ThreadPlan) -> None:
        self.readings = iter(readings)
        super().__init__(plan=plan)

    def _make_tuner(self, plan: ThreadPlan) -> AdaptiveThreads:
        return AdaptiveThreads(plan.intra_op, plan.intra_op, torch.set_num_threads,
                               read=lambda: next(self.readings, 1), clock=Clock())


def test_the_compute_thread_runs_each_job_with_the_team_the_tuner_chose():
    main_threads = torch.get_num_threads()
    # (the probe), quiet at 2 threads, a neighbour at 2, then quiet at 1
    compute = ScriptedCompute([0, 2, 2, 3, 3, 3, 1, 1, 1], ThreadPlan(2, 1, (0, 1), "test", adaptive=True))
    try:
        seen = [compute.run(torch.get_num_threads) for _ in range(8)]
        assert seen == [2, 2, 2, 2, 1, 1, 1, 2]  # OpenMP's count on the compute thread itself
        assert compute.threads_now() == 2
    finally:
        compute.close()
    assert torch.get_num_threads() == main_threads  # set on the compute thread only


def test_watching_a_model_takes_readings_before_each_layer_on_its_own_thread_only():
    reads = []
    tuner = AdaptiveThreads(2, 2, lambda n: None, read=lambda: reads.append(1) or 2, clock=Clock())
    reads.clear()  # the probe at construction
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]))
    tuner.watch(model)
    for layer in model[1]:  # the longest ModuleList: the decoder stack
        layer(torch.ones(1, 4))
    model[0](torch.ones(1, 4))  # not in the stack: no reading
    assert len(reads) == 3
    other = threading.Thread(target=lambda: [layer(torch.ones(1, 4)) for layer in model[1]])
    other.start()
    other.join()
    assert len(reads) == 3  # another thread's forward: its OpenMP team is not the tuner's
