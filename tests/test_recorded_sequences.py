"""The recorded sequences stable_reinforce trains on (thinker/store/recorded_sequences.py): kept
in the database, so a second store on the same file (a restarted server) finds them; each use
restarts their day; expired ones are neither returned nor kept."""

from __future__ import annotations

import time

import pytest

from thinker.store.database import Database
from thinker.store.recorded_sequences import RecordedSequences

pytestmark = pytest.mark.unit


def test_recorded_sequences_survive_a_restart_and_expire(tmp_path, monkeypatch):
    path = tmp_path / "thinker.db"
    store = RecordedSequences(Database(path), keep_s=100.0)
    store.record("sess-a", "alice", [("r1:0", [5, 6, 7], [-0.5, -1.25, -2.0]), ("r1:1", [8], [-0.125])])

    restarted = RecordedSequences(Database(path), keep_s=100.0)
    found = restarted.get(["r1:0", "r1:1", "r9:0"])
    assert sorted(found) == ["r1:0", "r1:1"]
    first = found["r1:0"]
    assert (first.session_id, first.owner) == ("sess-a", "alice")
    assert (first.tokens, first.logprobs) == ([5, 6, 7], [-0.5, -1.25, -2.0])

    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 60.0)
    assert sorted(restarted.get(["r1:0"])) == ["r1:0"]  # used at +60 s: now kept until +160 s
    monkeypatch.setattr(time, "time", lambda: now + 130.0)
    assert sorted(restarted.get(["r1:0", "r1:1"])) == ["r1:0"]  # r1:1 ran out at +100 s
    monkeypatch.setattr(time, "time", lambda: now + 1000.0)
    assert restarted.get(["r1:0"]) == {}
    restarted.record("sess-b", None, [("r2:0", [1], [-1.0])])  # a write purges what expired
    rows = restarted.db.query("SELECT sequence_id FROM recorded_sequences")
    assert rows == [("r2:0",)]
