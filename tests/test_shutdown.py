"""SIGTERM: running jobs finish, queued ones fail with a clear status, the process exits 0."""

from __future__ import annotations

import signal
import threading

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_sigterm_finishes_running_fails_queued_and_exits(start_server):
    server = start_server()
    created = requests.post(f"{server.url}/add_lora", json={"rank": 4, "alpha": 8.0}).json()
    adapter = requests.post(
        f"{server.url}/retrieve_future", json={"request_id": created["request_id"], "timeout": 30}
    ).json()["result"]["model_id"]
    # Two long samples of one live adapter: the second queues behind the first.
    body = {
        "base_model": adapter,
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 300, "temperature": 1.0, "stop": []},
    }
    running, queued = (requests.post(f"{server.url}/api/v1/asample", json=body).json()["request_id"] for _ in range(2))
    answers: dict[str, requests.Response] = {}

    def poll(request_id: str) -> None:
        while True:
            url = f"{server.url}/api/v1/retrieve_future"
            response = requests.post(url, json={"request_id": request_id}, timeout=90)
            if "json" not in response.headers["Content-Type"] or "try_again" not in response.text:
                answers[request_id] = response
                return

    pollers = [threading.Thread(target=poll, args=(r,)) for r in (running, queued)]
    for thread in pollers:
        thread.start()
    server.proc.send_signal(signal.SIGTERM)
    for thread in pollers:
        thread.join(timeout=120)
    assert server.proc.wait(timeout=120) == 0
    assert answers[running].headers["Content-Type"] == "application/x-protobuf"  # finished: the result
    failed = answers[queued].json()
    assert "shut down before this request ran" in failed["error"] and failed["category"] == "server"
    assert "finishing running jobs" in server.log()
