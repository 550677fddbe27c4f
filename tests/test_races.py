"""Correctness under concurrency: duplicates fired at once run once, the pool's lock is never
held over I/O, a late seq_id never runs out of order, and what the server remembers is bounded.

Concurrent duplicates are released together by a ``threading.Barrier``; "other jobs keep
flowing" is shown by counting completions while one completion is held on an Event.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import worker_pool
from thinker.core.config import Config
from thinker.core.errors import ConflictError, NotFoundError
from thinker.http.idempotency import Claims
from thinker.http.tinker import sessions
from thinker.obs import logs
from thinker.store.database import Database
from thinker.store.futures import COMPLETED, FAILED, current_owner
from worker_pool import WorkerPool

KEYS = ("tml-race-idem", "tml-race-quota")
QUOTA = 3


# ---- the pool's lock is not held over I/O ------------------------------------------------


class _SlowDatabase(Database):
    """A database whose write of one chosen future's outcome (or any read of a future
    from disk) blocks until released: a stand-in for a slow disk."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.slow_id: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def future_finished(self, future, *encoded) -> None:
        if future.id == self.slow_id:
            self.entered.set()
            self.release.wait(30)
        super().future_finished(future, *encoded)

    def load_future(self, future_id):
        self.entered.set()
        self.release.wait(30)
        return super().load_future(future_id)


def _others_complete_while_held(pool: WorkerPool, held: threading.Event, release: threading.Event, n: int = 6):
    """Submit ``n`` jobs of other keys once ``held`` is set, from another thread (a submit
    that needs the pool's lock would block): True if all finished before ``release``."""
    assert held.wait(10), "the slow step never started"
    finished = []
    all_done = threading.Event()

    def flow() -> None:
        futures = [pool.submit(f"other-{i}", "test", lambda i=i: i) for i in range(n)]
        for future in futures:
            future.wait(30)
            finished.append(future.status)
        all_done.set()

    threading.Thread(target=flow, daemon=True).start()
    try:
        return all_done.wait(10) and finished == [COMPLETED] * n and not release.is_set()
    finally:
        release.set()


@pytest.mark.unit
def test_a_slow_database_write_holds_up_no_other_job(tmp_path):
    database = _SlowDatabase(tmp_path / "thinker.db")
    pool = WorkerPool(2, database=database)
    try:
        slow = pool.reserve("slow", "test")
        database.slow_id = slow.id
        pool.submit("slow", "test", lambda: {"big": [0.5] * 1000}, future=slow)
        assert _others_complete_while_held(pool, database.entered, database.release)
        assert slow.wait(10) and slow.status == COMPLETED
        assert database.load_future(slow.id).result == {"big": [0.5] * 1000}  # stored all the same
    finally:
        database.release.set()
        pool.shutdown()


@pytest.mark.unit
def test_a_slow_log_handler_holds_up_no_other_job():
    pool = WorkerPool(2)
    pool.on_finish(logs.log_job)  # the one line per finished job, as the server logs it
    entered, release = threading.Event(), threading.Event()

    class Slow(logging.Handler):
        """Slow on the "slow" job's line only (and without holding the handler's own lock,
        which would stall every other line of this handler whatever the pool did)."""

        def handle(self, record: logging.LogRecord) -> bool:
            if logs.adapter_id.get() == "slow":
                entered.set()
                release.wait(30)
            return True

    handler, level = Slow(), logs.job_log.level
    logs.job_log.addHandler(handler)
    logs.job_log.setLevel(logging.INFO)
    try:
        first = pool.submit("slow", "test", lambda: 1)
        assert _others_complete_while_held(pool, entered, release)
        assert first.wait(10) and first.status == COMPLETED
    finally:
        release.set()
        logs.job_log.removeHandler(handler)
        logs.job_log.setLevel(level)
        pool.shutdown()


@pytest.mark.unit
def test_reading_a_future_from_the_database_holds_up_no_other_job(tmp_path):
    database = _SlowDatabase(tmp_path / "thinker.db")
    pool = WorkerPool(2, database=database)
    try:
        answers = []

        def read() -> None:
            try:
                pool.get("future_gone")  # not in memory: read from the database (blocked there)
            except NotFoundError as exc:
                answers.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert _others_complete_while_held(pool, database.entered, database.release)
        reader.join(10)
        assert len(answers) == 1
    finally:
        database.release.set()
        pool.shutdown()


# ---- a seq_id that arrives after its gap was skipped ---------------------------------------


@pytest.mark.unit
def test_a_late_seq_id_fails_clearly_and_never_runs_out_of_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "GAP_TIMEOUT_S", 0.05)
    database = Database(tmp_path / "thinker.db")
    pool = WorkerPool(2, database=database)
    ran: list[int] = []
    try:
        sequencer = sessions.Sequencer(pool, "model-a", database)

        def start(n: int):
            return lambda future: pool.submit("model-a", "test", lambda: ran.append(n), future=future)

        first = pool.get(sequencer.admit(1, "test", start(1)))
        third = pool.get(sequencer.admit(3, "test", start(3)))  # 2 is missing: 3 waits for the gap timeout
        assert first.wait(10) and third.wait(10) and third.status == COMPLETED
        late_id = sequencer.admit(2, "test", start(2))
        late = pool.get(late_id)
        assert late.wait(10) and late.status == FAILED
        assert late.error_type == "BadRequestError"
        assert "seq_id 2" in late.error and "after" in late.error and "out of order" in late.error
        assert ran == [1, 3]  # 2 never ran after 3
        assert sequencer.admit(2, "test", start(2)) == late_id  # a resend gets the same answer
    finally:
        pool.shutdown()
        database.close()


@pytest.mark.unit
def test_requests_released_by_different_threads_start_in_seq_id_order(tmp_path):
    database = Database(tmp_path / "thinker.db")
    pool = WorkerPool(1, database=database)
    started: list[int] = []
    in_start_2, go_on = threading.Event(), threading.Event()
    try:
        sequencer = sessions.Sequencer(pool, "model-b", database)

        def start(n: int):
            def run(future) -> None:
                if n == 2:  # the thread that released 1 and 2 is slow to start 2
                    in_start_2.set()
                    go_on.wait(30)
                started.append(n)
                pool.fail(future, ConflictError("not run"))

            return run

        sequencer.admit(2, "test", start(2))  # held: 1 is missing
        first = threading.Thread(target=sequencer.admit, args=(1, "test", start(1)), daemon=True)
        first.start()  # releases 1 and 2
        assert in_start_2.wait(10)
        third = threading.Thread(target=sequencer.admit, args=(3, "test", start(3)), daemon=True)
        third.start()  # its turn has come: it must still start after 2
        third.join(0.5)  # (time for the bug to show; the order below holds however long this takes)
        go_on.set()
        first.join(10)
        third.join(10)
        assert started == [1, 2, 3]
    finally:
        go_on.set()
        pool.shutdown()
        database.close()


# ---- bounded memory -------------------------------------------------------------------------


@pytest.mark.unit
def test_finished_results_in_memory_are_bounded_and_stay_readable_from_the_database(tmp_path):
    database = Database(tmp_path / "thinker.db")
    pool = WorkerPool(1, database=database, max_result_bytes=20_000)
    try:
        result = {"logprobs": [0.125] * 600}  # ~4.8 KB of JSON each: 4 fit
        futures = [pool.submit("a", "test", lambda: result) for _ in range(12)]
        assert all(f.wait(10) and f.status == COMPLETED for f in futures)
        store = pool._store
        assert 0 < store.result_bytes <= 20_000
        in_memory = [f for f in futures if f.id in store]
        assert 0 < len(in_memory) < len(futures)
        assert in_memory == futures[-len(in_memory) :]  # the oldest went first
        for future in futures:
            again = pool.get(future.id)
            assert again.status == COMPLETED and again.result == result
        assert pool.get(futures[0].id) is not futures[0]  # read back from the database
    finally:
        pool.shutdown()
        database.close()


@pytest.mark.unit
def test_the_result_cache_bound_is_configurable():
    assert Config().max_result_cache_bytes == 256 * 1024 * 1024
    assert Config.from_env({"MAX_RESULT_CACHE_BYTES": "1000"}).max_result_cache_bytes == 1000


@pytest.mark.unit
def test_per_owner_bookkeeping_is_bounded():
    pool = WorkerPool(1)
    owners = 3 * worker_pool._SERVED_KEPT
    try:
        futures = []
        for i in range(owners):
            token = current_owner.set(f"owner-{i}")
            try:
                futures.append(pool.submit(None, "test", lambda: None))
            finally:
                current_owner.reset(token)
        assert all(f.wait(10) for f in futures)
        assert len(pool._served) <= worker_pool._SERVED_KEPT
        assert pool.pending_by_owner() == {} and pool._store.pending_by_owner() == {}
    finally:
        pool.shutdown()


@pytest.mark.unit
def test_the_database_connection_closes_with_the_app(cache_dir, tmp_path):
    from app import close_app, create_app

    config = Config(
        base_model="builtin-tiny", thinker_cache_dir=str(cache_dir), thinker_data_dir=str(tmp_path), device="cpu",
        max_workers=1,
    )
    app = create_app(config)
    database = app.extensions["thinker"].database
    assert database.query("SELECT 1") == [(1,)]
    close_app(app)
    with pytest.raises(sqlite3.ProgrammingError):
        database.query("SELECT 1")


# ---- check-then-act over HTTP ---------------------------------------------------------------


@pytest.mark.unit
def test_an_idempotency_key_claimed_too_long_answers_409():
    claims = Claims(wait_s=0.01)
    claims.acquire("alice", "k")
    with pytest.raises(ConflictError, match="still in progress"):
        claims.acquire("alice", "k")
    claims.acquire("bob", "k")  # keys are per owner
    claims.release("alice", "k")
    claims.acquire("alice", "k")  # free again once released
    claims.release("alice", "k")
    claims.release("bob", "k")
    assert len(claims) == 0


@pytest.fixture(scope="module")
def racy(start_server):
    return start_server(MAX_WORKERS="2", THINKER_API_KEYS=",".join(KEYS), MAX_ADAPTERS_PER_USER=str(QUOTA))


def _all_at_once(n: int, send) -> list:
    barrier = threading.Barrier(n, timeout=30)

    def one(_i: int):
        barrier.wait()
        return send()

    with ThreadPoolExecutor(n) as threads:
        return list(threads.map(one, range(n)))


def _wait(server, key: str, request_id: str) -> dict:
    response = requests.post(
        f"{server.url}/retrieve_future", json={"request_id": request_id, "timeout": 30},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )
    assert response.status_code in (200, 500), response.text
    return response.json()


def _adapters(server, key: str) -> list:
    response = requests.get(f"{server.url}/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return response.json()["adapters"]


@pytest.mark.e2e
def test_concurrent_duplicates_with_one_idempotency_key_run_once(racy):
    key = KEYS[0]
    auth = {"Authorization": f"Bearer {key}"}
    created = requests.post(f"{racy.url}/add_lora", json={"base_model": "builtin-tiny"}, headers=auth, timeout=60)
    model_id = _wait(racy, key, created.json()["request_id"])["result"]["model_id"]
    # Many examples: tokenizing them keeps each duplicate busy between "no answer stored yet"
    # and "answer stored", where the duplicates would all slip through without a claim.
    chat = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]
    body = {"model_id": model_id, "data": [chat] * 128}

    def send():
        headers = {**auth, "Idempotency-Key": "train-once"}
        return requests.post(f"{racy.url}/fwdbwd", json=body, headers=headers, timeout=60)

    answers = _all_at_once(8, send)
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert all(b == bodies[0] for b in bodies)  # one job, one answer for all
    done = _wait(racy, key, bodies[0]["request_id"])
    assert done["status"] == "completed"
    (adapter,) = _adapters(racy, key)
    assert adapter["tokens_trained"] == done["result"]["num_tokens"]  # trained once


@pytest.mark.e2e
def test_concurrent_creations_never_exceed_the_adapter_quota(racy):
    key = KEYS[1]
    headers = {"Authorization": f"Bearer {key}"}

    def send():
        return requests.post(f"{racy.url}/add_lora", json={"base_model": "builtin-tiny"}, headers=headers, timeout=60)

    answers = _all_at_once(8, send)
    outcomes = []
    for answer in answers:
        if answer.status_code == 400:  # refused at the edge: the quota was already full
            outcomes.append(answer.json()["error"])
            continue
        assert answer.status_code == 200, answer.text
        done = _wait(racy, key, answer.json()["request_id"])
        outcomes.append(done["status"] if done["status"] == "completed" else done["error"])
    assert outcomes.count("completed") == QUOTA
    refused = [o for o in outcomes if o != "completed"]
    assert len(refused) == 8 - QUOTA and all("MAX_ADAPTERS_PER_USER" in o for o in refused)
    assert len(_adapters(racy, key)) == QUOTA
