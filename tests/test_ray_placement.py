"""The placement table (backend/cluster/placement.py): pure bookkeeping, no Ray, so unit lane."""

from __future__ import annotations

import pytest

from backend.cluster.placement import DOWN, DRAINING, Placement

pytestmark = pytest.mark.unit


def table(*workers: str, slack: int = 4) -> Placement:
    placement = Placement(slack=slack)
    for name in workers:
        placement.add_worker(name)
    return placement


def test_new_users_go_to_the_least_loaded_worker_and_stay():
    p = table("w0", "w1")
    first = p.choose(group="alice")
    p.place("a1", first)
    second = p.choose(group="bob")
    assert second != first  # bob's first adapter: the empty worker
    p.place("b1", second)
    assert p.home("a1") == first  # sticky


def test_one_users_adapters_go_together_until_that_worker_is_slack_ahead():
    p = table("w0", "w1", slack=2)
    homes = []
    for i in range(4):
        worker = p.choose(group="alice")
        p.place(f"a{i}", worker)
        homes.append(worker)
    # together while within 2 of the least loaded (0): a0..a2 on one worker, a3 spills over
    assert homes[:3] == [homes[0]] * 3 and homes[3] != homes[0]


def test_draining_and_down_workers_take_nothing_new():
    p = table("w0", "w1", "w2")
    p.set_state("w0", DRAINING)
    p.set_state("w1", DOWN)
    assert {p.choose(group=f"user{i}") for i in range(3)} == {"w2"}
    p.set_state("w2", DOWN)
    with pytest.raises(LookupError, match="no model worker is up"):
        p.choose()


def test_evicting_a_dead_worker_keeps_replicas_elsewhere():
    p = table("w0", "w1")
    p.place("trained", "w0")
    p.place("frozen", "w0")
    p.place("frozen", "w1")  # a sampler checkpoint loaded on both
    assert p.evict("w0") == ["frozen", "trained"]
    assert p.homes("frozen") == ["w1"] and p.home("trained") is None
    assert p.held("w0") == []


def test_least_busy_picks_among_replicas_by_calls_in_flight():
    p = table("w0", "w1", "w2")
    for w in ("w0", "w1"):
        p.place("frozen", w)
    p.begin("w0")
    assert p.least_busy(p.homes("frozen")) == "w1"
    p.begin("w1")
    p.begin("w1")
    assert p.least_busy(p.homes("frozen")) == "w0"
    p.end("w0")
    assert p.busy("w0") == 0


def test_unplace_from_one_worker_moves_the_home():
    p = table("w0", "w1")
    p.place("a", "w0")
    p.place("a", "w1")  # a move: on the target first ...
    assert p.unplace("a", "w0") == ["w0"]  # ... then off the source
    assert p.homes("a") == ["w1"] and p.held("w0") == []
    assert p.table()[1] == {"name": "w1", "state": "up", "adapters_placed": 1, "queue": 0}


def test_a_rebalance_plan_evens_the_load_moving_single_copies_only():
    p = table("w0", "w1", "w2")
    for i in range(5):
        p.place(f"a{i}", "w0")
    p.place("frozen", "w0")
    p.place("frozen", "w1")  # a replica: never moved
    plan = p.rebalance_plan()
    assert all(a != "frozen" and src == "w0" for a, src, _ in plan)
    for adapter_id, src, dst in plan:
        p.place(adapter_id, dst)
        p.unplace(adapter_id, src)
    counts = sorted(row["adapters_placed"] for row in p.table())
    assert counts[-1] - counts[0] <= 1 and sum(counts) == 7
    assert p.rebalance_plan() == []
