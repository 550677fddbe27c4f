"""Sequences sampled with ``record_stability_info``: what the ``stable_reinforce`` loss trains on.

Tinker's contract: every sequence such a sampler returns is recorded under its ``sequence_id``;
it belongs to the session that sampled it, and a training request of that session may name it
for one day after sampling, each use restarting the day. So the record is durable (the
``recorded_sequences`` table): an RL loop that resumes after a server restart still trains on
the batch it sampled before, as it would on the hosted service. Rows are small (a sequence's
tokens and logprobs as packed arrays) and expired ones are deleted as new ones are written.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from thinker.store.database import Database

KEEP_S = 24 * 3600.0  # one day after sampling, or after the last training request that used it
PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class RecordedSequence:
    sequence_id: str
    session_id: str
    owner: str | None
    tokens: list[int]  # the sampled tokens, as returned
    logprobs: list[float]  # the sampler's own logprob of each, recorded when it sampled them


def _pack(values: Sequence, code: str) -> bytes:
    return array(code, values).tobytes()


def _unpack(blob: bytes, code: str) -> list:
    values = array(code)
    values.frombytes(blob)
    return values.tolist()


class RecordedSequences:
    def __init__(self, database: Database, keep_s: float = KEEP_S) -> None:
        self.db = database
        self.keep_s = keep_s
        self._purged_at = 0.0

    def record(
        self, session_id: str, owner: str | None, sequences: Sequence[tuple[str, Sequence[int], Sequence[float]]]
    ) -> None:
        """Record (sequence_id, tokens, logprobs) triples sampled in ``session_id``. A full disk
        raises (507): a sequence the client was promised it can train on must really be there."""
        now = time.time()
        rows = [
            (sequence_id, session_id, owner, _pack(tokens, "q"), _pack(logprobs, "d"), now + self.keep_s)
            for sequence_id, tokens, logprobs in sequences
        ]
        # One statement per request (this runs as the sampler hands the result back)
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            self.db.execute(
                "INSERT OR REPLACE INTO recorded_sequences (sequence_id, session_id, owner, tokens, logprobs, "
                "expires_at) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
                tuple(value for row in chunk for value in row),
            )
        if now - self._purged_at > PURGE_EVERY_S:
            self._purged_at = now
            self.db.record("DELETE FROM recorded_sequences WHERE expires_at < ?", (now,), "the expiry of sequences")

    def get(self, sequence_ids: Sequence[str]) -> dict[str, RecordedSequence]:
        """The unexpired ones among ``sequence_ids``, by id; using them restarts their day."""
        ids = sorted(set(sequence_ids))
        now, found = time.time(), {}
        for start in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.query(
                f"SELECT sequence_id, session_id, owner, tokens, logprobs FROM recorded_sequences "
                f"WHERE expires_at >= ? AND sequence_id IN ({marks})",
                (now, *chunk),
            )
            for sequence_id, session_id, owner, tokens, logprobs in rows:
                found[sequence_id] = RecordedSequence(
                    sequence_id, session_id, owner, _unpack(tokens, "q"), _unpack(logprobs, "d")
                )
        if found:
            marks = ",".join("?" * len(found))
            self.db.record(
                f"UPDATE recorded_sequences SET expires_at = ? WHERE sequence_id IN ({marks})",
                (now + self.keep_s, *found),
                "a recorded sequence's new expiry",
            )
        return found
