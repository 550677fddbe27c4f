"""Test lanes: every test is marked unit, e2e, browser, cookbook or ray (slow on top where it is), and a run
with a test in no lane stops at collection, naming it (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, pytest_collection_modifyitems

pytestmark = pytest.mark.unit


class Item:
    def __init__(self, nodeid: str, *marks: str) -> None:
        self.nodeid, self.marks = nodeid, marks

    def get_closest_marker(self, name: str):
        return name if name in self.marks else None


def test_a_test_in_no_lane_stops_the_run_and_is_named():
    items = [
        Item("t.py::a", "unit"),
        Item("t.py::b", "slow"),
        Item("t.py::c", "e2e", "slow"),
        Item("t.py::d", "browser"),
        Item("t.py::e", "cookbook"),
        Item("t.py::f", "ray", "slow"),
    ]
    with pytest.raises(pytest.UsageError, match=r"1 tests are in no lane.*\n  t\.py::b$"):
        pytest_collection_modifyitems(None, items)
    pytest_collection_modifyitems(None, [items[0], *items[2:]])  # all in lanes: no complaint


@pytest.mark.slow  # a second pytest collecting the whole suite: ~10 s on 2 busy cores
def test_each_test_is_in_exactly_one_lane():
    lanes = ("unit", "e2e", "browser", "cookbook", "ray")
    none = " and ".join(f"not {lane}" for lane in lanes)
    two = " or ".join(f"({a} and {b})" for i, a in enumerate(lanes) for b in lanes[i + 1 :])
    wrong = f"({none}) or {two}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", wrong],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 5, done.stdout + done.stderr  # 5: collected fine, nothing selected
