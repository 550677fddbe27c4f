"""Torch's threads (TORCH_THREADS): parsed and validated, resolved to a plan, applied on the
compute thread, and reported at start-up."""

from __future__ import annotations

import os
import re

import pytest
import requests
import torch

from backend import load_backend
from backend.compute_thread import ComputeThread, ThreadPlan, plan_threads
from thinker.core.config import Config
from thinker.core.errors import ConfigurationError


@pytest.fixture
def keep_main_threads():
    """Applying a plan also changes this thread's count: put it back for the tests after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.unit
@pytest.mark.parametrize("raw", ["auto", "AUTO", " auto ", "1", "3", "16"])
def test_good_values_are_accepted(raw):
    assert Config.from_env({"TORCH_THREADS": raw}).torch_threads == raw


@pytest.mark.unit
@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "2 threads", "max"])
def test_bad_values_are_refused_naming_the_variable(raw):
    says = rf"TORCH_THREADS must be auto or a whole number >= 1, got '{re.escape(raw)}'"
    with pytest.raises(ConfigurationError, match=says):
        Config.from_env({"TORCH_THREADS": raw})


@pytest.mark.unit
def test_default_is_auto():
    assert Config().torch_threads == "auto" and Config.from_env({}).torch_threads == "auto"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("setting", "environ", "cpus", "threads", "why"),
    [
        ("3", {}, (0, 1), 3, "TORCH_THREADS=3"),
        ("3", {"OMP_NUM_THREADS": "5"}, (0, 1), 3, "TORCH_THREADS=3"),  # an explicit number wins
        ("auto", {"OMP_NUM_THREADS": "5", "OMP_WAIT_POLICY": "PASSIVE"}, (0, 1), 5, "OMP_NUM_THREADS=5"),
        ("auto", {}, (0, 1), 2, "up to all 2 CPUs, fewer while other processes use them"),
        ("auto", {"OMP_WAIT_POLICY": "PASSIVE"}, (0, 1), 2, "up to all 2 CPUs"),
        ("auto", {}, (0,), 1, "up to all 1 CPUs"),
        ("auto", {}, tuple(range(16)), 16, "up to all 16 CPUs"),
        ("auto", {"OMP_NUM_THREADS": "junk"}, (0, 1, 2, 3), 4, "up to all 4 CPUs"),
    ],
)
def test_plan_resolves_the_setting(setting, environ, cpus, threads, why):
    plan = plan_threads(setting, environ, cpus)
    assert (plan.intra_op, plan.inter_op, plan.cpus) == (threads, 1, cpus)
    assert why in plan.why and why in plan.describe()
    assert plan.adaptive == ("up to" in why)  # only auto without OMP_NUM_THREADS adapts


@pytest.mark.unit
def test_an_adaptive_plan_says_its_range():
    line = ThreadPlan(4, 1, (0, 1, 2, 3), "auto", adaptive=True).describe()
    assert line.startswith("Torch threads: 1-4 intra-op, 1 inter-op, ")


@pytest.mark.unit
def test_describe_names_threads_cpus_and_the_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    line = ThreadPlan(2, 1, (0, 1, 2, 5), "TORCH_THREADS=2").describe()
    assert line == "Torch threads: 2 intra-op, 1 inter-op, OMP_WAIT_POLICY=PASSIVE, CPUs 0-2,5 (TORCH_THREADS=2)"


@pytest.mark.unit
@pytest.mark.parametrize("threads", [1, 3])
def test_the_compute_thread_applies_its_plan_first(threads, keep_main_threads):
    compute = ComputeThread(plan=ThreadPlan(threads, 1, (0,), "test"))
    try:
        assert compute.run(torch.get_num_threads) == threads
    finally:
        compute.close()


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["1", "2"])
def test_load_backend_runs_torch_with_the_configured_threads(setting, cache_dir, tmp_path, keep_main_threads):
    """OMP_NUM_THREADS=1 (as the test lanes run) or not, the compute thread uses TORCH_THREADS."""
    config = Config(base_model="builtin-tiny", thinker_cache_dir=str(cache_dir), device="cpu", torch_threads=setting)
    backend = load_backend(config, tmp_path)
    try:
        assert backend.compute.plan.intra_op == int(setting)
        assert backend.compute.run(torch.get_num_threads) == int(setting)
        assert backend.complete(None, [[5, 6, 7]], _greedy(4))[0].tokens  # and model work runs there
    finally:
        backend.close()


def _greedy(tokens: int):
    from backend import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0, stop_at_eos=False)


@pytest.mark.e2e
def test_server_logs_its_threads_at_start_up(server):
    expected = plan_threads(server.env["TORCH_THREADS"])
    log = server.log()
    pattern = r"Torch threads: ([\d-]+) intra-op, 1 inter-op, OMP_WAIT_POLICY=(\w+), CPUs [\d,-]+ \((.+)\)"
    match = re.search(pattern, log)
    assert match, f"no threads line in:\n{log}"
    assert match[1].split("-")[-1] == str(expected.intra_op) and match[3] == expected.why
    assert match[2] == os.environ.get("OMP_WAIT_POLICY", "unset")


@pytest.mark.e2e
def test_an_auto_server_adapts_and_says_so(start_server):
    """TORCH_THREADS=auto: the range in the start-up line, the team now in /healthz, and the
    server samples with it."""
    server = start_server(TORCH_THREADS="auto", OMP_NUM_THREADS="")
    usable = len(os.sched_getaffinity(0))
    assert re.search(rf"Torch threads: {'1-' if usable > 1 else ''}{usable} intra-op", server.log())
    sample = {"model_id": "base", "prompts": ["Hi"], "sampling_params": {"max_tokens": 4, "temperature": 0}}
    assert requests.post(f"{server.url}/api/v1/sample", json=sample, timeout=120).json()["num_tokens"] == [4]
    health = requests.get(f"{server.url}/healthz", timeout=30).json()
    if usable > 1:
        assert 1 <= health["torch_threads"] <= usable and health["torch_thread_changes"] >= 0


@pytest.mark.unit
@pytest.mark.parametrize(("raw", "cpus"), [("", ()), ("0", (0,)), ("0-2,5", (0, 1, 2, 5)), (" 3, 1 ", (1, 3))])
def test_compute_cpus_are_parsed(raw, cpus):
    from thinker.core.config import parse_cpu_list

    assert Config.from_env({"COMPUTE_CPUS": raw}).compute_cpus == raw
    assert parse_cpu_list(raw) == cpus


@pytest.mark.unit
@pytest.mark.parametrize("raw", ["x", "2-1", "-1", "0-", "1;2"])
def test_bad_compute_cpus_are_refused_naming_the_variable(raw):
    with pytest.raises(ConfigurationError, match=r"COMPUTE_CPUS must be a CPU list such as 0-3 or 0,2"):
        Config.from_env({"COMPUTE_CPUS": raw})


@pytest.mark.unit
def test_a_pin_outside_the_usable_cpus_is_refused_and_one_inside_says_so():
    refused = r"COMPUTE_CPUS=7 names CPUs this process may not use \(it may use 0-1\)"
    with pytest.raises(ConfigurationError, match=refused):
        plan_threads("auto", {}, (0, 1), pin=(7,))
    plan = plan_threads("auto", {}, (0, 1, 2, 3), pin=(2, 3))
    assert (plan.cpus, plan.intra_op, plan.pinned) == ((2, 3), 2, True)  # auto counts the pinned CPUs only
    assert "CPUs 2-3 pinned (COMPUTE_CPUS)" in plan.describe()


@pytest.mark.unit
def test_the_compute_thread_runs_on_its_pinned_cpus_only(keep_main_threads):
    before = os.sched_getaffinity(0)
    pin = (min(before),)
    compute = ComputeThread(plan=plan_threads("1", {}, tuple(sorted(before)), pin=pin))
    try:
        assert compute.run(os.sched_getaffinity, 0) == set(pin)
    finally:
        compute.close()
    assert os.sched_getaffinity(0) == before  # the process's other threads are not pinned


@pytest.mark.unit
def test_auto_never_exceeds_the_cpu_quota():
    plan = plan_threads("auto", {}, tuple(range(64)), cpu_limit=2.0)
    assert (plan.intra_op, plan.adaptive) == (2, True) and "up to 2 of 64 CPUs (a CPU quota of 2)" in plan.why
    assert plan_threads("auto", {}, (0, 1, 2, 3), cpu_limit=0.5).intra_op == 1
    assert plan_threads("auto", {}, (0, 1), cpu_limit=8.0).intra_op == 2  # more quota than CPUs: the CPUs
    assert plan_threads("3", {}, (0, 1), cpu_limit=1.0).intra_op == 3  # a number is a number


@pytest.mark.unit
@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cg": "0::/app\n", "sys/app/cpu.max": "250000 100000\n"}, 2.5),  # cgroup v2, the process's group
        ({"cg": "0::/\n", "sys/cpu.max": "max 100000\n"}, None),  # v2, no quota
        ({"cg": "3:cpu,cpuacct:/\n", "sys/cpu/cpu.cfs_quota_us": "200000\n", "sys/cpu/cpu.cfs_period_us": "100000\n"},
         2.0),  # cgroup v1
        ({"cg": "3:cpu:/\n", "sys/cpu/cpu.cfs_quota_us": "-1\n", "sys/cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cg": "0::/\n"}, None),  # nothing to read
    ],
)
def test_the_cgroup_cpu_quota_is_read(tmp_path, files, limit):
    from backend.compute_thread import cgroup_cpu_limit

    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cgroup_cpu_limit(str(tmp_path / "sys"), str(tmp_path / "cg")) == limit
