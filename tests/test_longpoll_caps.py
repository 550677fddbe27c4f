"""Per-user caps on requests in flight: one key's pile of long-polls on futures that stay
pending gets 429 + Retry-After past MAX_LONG_POLLS_PER_USER, and another key's requests
keep their idle latency."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import requests

from thinker.http.caps import InFlight

ALICE, BOB = "tml-alice-polls-1", "tml-bob-polls-22"
LONG_POLLS = 24  # more than HTTP_THREADS below: without the cap they would hold every thread


@pytest.fixture(scope="module")
def capped(start_server):
    return start_server(
        THINKER_API_KEYS=f"{ALICE},{BOB}",
        HTTP_THREADS="16",
        MAX_OPEN_REQUESTS_PER_USER="8",
        MAX_LONG_POLLS_PER_USER="4",
    )


def post(server, path: str, key: str, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, headers={"X-API-Key": key}, timeout=timeout)


def pending_future(server, key: str) -> tuple[str, str]:
    """(model_id, request_id) of a Tinker optim_step that waits for seq_id 1, which never
    comes: its future stays pending for GAP_TIMEOUT_S (30 s), or until seq_id 1 arrives."""
    session = post(server, "/api/v1/create_session", key, {}).json()["session_id"]
    created = post(
        server, "/api/v1/create_model", key,
        {"session_id": session, "model_seq_id": 0, "base_model": "builtin-tiny", "lora_config": {"rank": 4}},
    ).json()
    poll = {"request_id": created["request_id"]}
    while "try_again" in (done := post(server, "/api/v1/retrieve_future", key, poll).text):
        pass
    model_id = created["model_id"]
    held = post(server, "/api/v1/optim_step", key, {"model_id": model_id, "seq_id": 2}).json()
    assert "error" not in done, done
    return model_id, held["request_id"]


def adapters_latency_s(server, key: str) -> float:
    started = time.perf_counter()
    response = requests.get(f"{server.url}/adapters", headers={"X-API-Key": key}, timeout=120)
    assert response.status_code == 200
    return time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.e2e
def test_long_polls_of_one_key_are_capped_and_another_key_keeps_its_latency(capped):
    for _ in range(3):
        adapters_latency_s(capped, BOB)  # warm-up
    idle = statistics.median(adapters_latency_s(capped, BOB) for _ in range(9))
    model_id, request_id = pending_future(capped, ALICE)

    answers: list[requests.Response] = []
    answered = threading.Condition()

    def long_poll(i: int) -> None:  # both long-poll routes count
        if i % 2:
            response = post(capped, "/api/v1/retrieve_future", ALICE, {"request_id": request_id}, timeout=120)
        else:
            response = post(capped, "/retrieve_future", ALICE, {"request_id": request_id, "timeout": 30}, timeout=120)
        with answered:
            answers.append(response)
            answered.notify_all()

    polls = [threading.Thread(target=long_poll, args=(i,), daemon=True) for i in range(LONG_POLLS)]
    for thread in polls:
        thread.start()
    refused_count = LONG_POLLS - 4
    with answered:  # the excess is answered at once; 4 stay held (the future is pending for 30 s)
        assert answered.wait_for(lambda: len(answers) >= refused_count, timeout=20), len(answers)
        refused = list(answers)
    assert all(r.status_code == 429 for r in refused), [r.status_code for r in refused]
    assert all(r.headers["Retry-After"] == "1" for r in refused)
    assert "MAX_LONG_POLLS_PER_USER" in refused[0].json()["error"]

    busy = statistics.median(adapters_latency_s(capped, BOB) for _ in range(9))
    # Bob's own long-polls are his to spend (404: the future is not his, but no 429).
    assert post(capped, "/api/v1/retrieve_future", BOB, {"request_id": request_id}).status_code == 404
    with answered:
        assert len(answers) == refused_count  # Alice's 4 were held all along
    # seq_id 1 arrives: the held optim_step runs and the 4 long-polls answer.
    post(capped, "/api/v1/optim_step", ALICE, {"model_id": model_id, "seq_id": 1})
    for thread in polls:
        thread.join(timeout=120)
    assert [r.status_code for r in answers[refused_count:]] == [200] * 4
    assert busy <= 2 * idle + 0.05, (idle, busy)


@pytest.mark.unit
def test_in_flight_counts_refuse_without_counting():
    counts = InFlight()
    assert counts.enter("a", ("open", "long_poll"), (2, 1)) is None
    assert counts.enter("a", ("open", "long_poll"), (2, 1)) == ("long_poll", 1)
    assert counts.enter("a", ("open",), (2,)) is None  # the refused long-poll took no open slot
    assert counts.enter("a", ("open",), (2,)) == ("open", 2)
    assert counts.enter("b", ("open", "long_poll"), (2, 1)) is None  # per user
    counts.leave("a", ("open", "long_poll"))
    assert counts.enter("a", ("open", "long_poll"), (2, 1)) is None
