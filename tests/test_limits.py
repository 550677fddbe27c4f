"""Limits on a live server: pending requests (429 + Retry-After), body size (413), sequence
length and adapters per user (400 naming the limit), and fairness between users."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALICE, BOB = "tml-alice-limit-1", "tml-bob-limit-22"
CHAT = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


@pytest.fixture(scope="module")
def limited(start_server):
    return start_server(
        THINKER_API_KEYS=f"{ALICE},{BOB}",
        MAX_PENDING_PER_USER="3",
        MAX_BODY_BYTES="20000",
        MAX_SEQUENCE_TOKENS="64",
        MAX_ADAPTERS_PER_USER="2",
    )


def post(server, path: str, key: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, headers={"X-API-Key": key}, timeout=60)


def slow_sample(server, key: str) -> requests.Response:
    body = {
        "base_model": "builtin-tiny",
        "num_samples": 4,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    return post(server, "/api/v1/asample", key, body)


def test_unfinished_requests_per_user_are_bounded(limited):
    accepted = [slow_sample(limited, ALICE) for _ in range(3)]
    assert all(r.status_code == 200 for r in accepted)
    refused = slow_sample(limited, ALICE)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "limit is 3" in refused.json()["error"]
    assert slow_sample(limited, BOB).status_code == 200  # the limit is per user
    for response in accepted:  # once results exist, alice may send again
        request_id = response.json()["request_id"]
        while "json" in post(limited, "/api/v1/retrieve_future", ALICE, {"request_id": request_id}).headers[
            "Content-Type"
        ]:
            pass  # try_again; the result itself comes as protobuf
    assert slow_sample(limited, ALICE).status_code == 200


def test_body_size_sequence_length_and_adapter_quota(limited):
    too_big = post(limited, "/fwdbwd", ALICE, {"model_id": "x", "data": [[{"role": "user", "content": "a" * 30000}]]})
    assert too_big.status_code == 413 and too_big.json()["type"] == "PayloadTooLargeError"

    adapters = []
    for _ in range(2):
        queued = post(limited, "/add_lora", BOB, {"rank": 4, "alpha": 8.0}).json()
        done = post(limited, "/retrieve_future", BOB, {"request_id": queued["request_id"], "timeout": 30}).json()
        adapters.append(done["result"]["model_id"])
    third = post(limited, "/add_lora", BOB, {"rank": 4, "alpha": 8.0})
    assert third.status_code == 400 and "MAX_ADAPTERS_PER_USER" in third.json()["error"]

    long_chat = [[{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]]
    too_long = post(limited, "/fwdbwd", BOB, {"model_id": adapters[0], "data": long_chat})
    assert too_long.status_code == 400 and "limit of 64 per sequence" in too_long.json()["error"]


def test_a_flooding_user_does_not_starve_another(start_server):
    """Alice keeps dozens of requests queued on 40 adapters at all times; Bob's requests, sent
    meanwhile, wait in the queue far less than hers: about one pass (the one running when his
    arrives), where hers wait their turn behind each other. Both waits are the server's own
    (submitted -> a worker took it, from the dashboard), measured at the same time on the same
    server, so a busy machine stretches both alike: their ratio is asserted, not a time."""
    # A 1 ms gathering window: what is measured is the order of service, not the window (<= 10 windows).
    server = start_server(THINKER_API_KEYS=f"{ALICE},{BOB}", MAX_BATCH_SEQUENCES="8", BATCH_WINDOW_MS="1")

    def new_adapter(key: str) -> str:
        queued = post(server, "/add_lora", key, {"rank": 4, "alpha": 8.0}).json()
        return post(server, "/retrieve_future", key, {"request_id": queued["request_id"], "timeout": 30}).json()[
            "result"
        ]["model_id"]

    def bob_step(adapter: str) -> str:
        queued = post(server, "/fwdbwd", BOB, {"model_id": adapter, "data": CHAT}).json()
        done = post(server, "/retrieve_future", BOB, {"request_id": queued["request_id"], "timeout": 60}).json()
        assert done["status"] == "completed"
        return queued["request_id"]

    def queued_ms(key: str) -> dict[str, float]:
        """The server's queue wait of the key's newest finished requests, by request id."""
        recent = requests.get(f"{server.url}/dashboard/state", headers={"X-API-Key": key}, timeout=60).json()
        return {r["id"]: r["queued_ms"] for r in recent["recent_requests"] if r["kind"] == "fwdbwd"}

    bob = new_adapter(BOB)
    alice = [new_adapter(ALICE) for _ in range(40)]
    for _ in range(3):
        bob_step(bob)  # warm-up

    stop = threading.Event()

    def flood(adapters: list[str]) -> None:
        while not stop.is_set():  # bursts: the queue stays full without a storm of HTTP calls
            ids = [post(server, "/fwdbwd", ALICE, {"model_id": a, "data": CHAT * 4}).json() for a in adapters]
            for queued in ids:
                post(server, "/retrieve_future", ALICE, {"request_id": queued["request_id"], "timeout": 60})

    threads = [threading.Thread(target=flood, args=(alice[i::4],), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while requests.get(f"{server.url}/healthz", timeout=60).json()["queued"] < 8:  # the flood is on
            assert time.monotonic() < deadline, "the flood never filled the queue"
        sent = [bob_step(bob) for _ in range(15)]
        pending = requests.get(f"{server.url}/healthz").json()["queued"]
        alice_waits = list(queued_ms(ALICE).values())  # her newest, finished during the flood
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    bob_waits = [queued_ms(BOB)[request_id] for request_id in sent]
    assert pending >= 8, "the flood did not keep the queue full"
    assert len(alice_waits) >= 10, alice_waits
    # Fair: Bob waits ~1 pass, Alice many (up to 40 jobs queued, 2 per pass). Measured: a ratio
    # of ~0.05, also with three CPU hogs running; ~0.6 with the scheduler serving in arrival order.
    assert statistics.median(bob_waits) <= 0.25 * statistics.median(alice_waits), (bob_waits, alice_waits)
