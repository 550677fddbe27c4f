"""OpenAI requests nobody waits for any more stop decoding (a real server over HTTP).

A streaming client that reads a couple of events and hangs up, and a non-streaming request
whose wait times out, must not leave their rows decoding on to max_tokens. Measured in the
server's own decode-loop steps (``sampling_steps`` on /healthz): a request run to its end
takes about ``MAX_TOKENS`` of them; a cancelled one far fewer.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
import requests

from thinker.http.oai.generate import Cancel

MAX_TOKENS = 480  # builtin-tiny's window is 512: a short prompt and these fit
WAIT_S = 120  # polling deadline, never reached when things work
CHAT = "/oai/api/v1/chat/completions"


def health(server) -> dict:
    return requests.get(f"{server.url}/healthz", timeout=30).json()


def wait_idle(server) -> dict:
    """/healthz once no sampling job is queued or running and the decode batch is empty."""
    deadline = time.monotonic() + WAIT_S
    while True:
        h = health(server)
        if (h["queued"], h["running"], h["sampling_rows"]) == (0, 0, 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)  # polling for the server to settle, not ordering events


def chat(server, stream: bool) -> dict:
    model = requests.get(f"{server.url}/oai/api/v1/models", timeout=30).json()["data"][0]["id"]
    # Greedy: builtin-tiny runs this prompt to max_tokens (checked below, not assumed).
    messages = [{"role": "user", "content": "Hi"}]
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


@pytest.fixture(scope="module")
def impatient_server(start_server):
    """Every sampling wait times out at once."""
    return start_server(MAX_WORKERS="2", SAMPLE_TIMEOUT_S="0.001")


@pytest.mark.e2e
def test_a_stream_whose_client_hangs_up_leaves_the_decode_loop(server):
    before = wait_idle(server)
    # The same request, waited for: it runs all MAX_TOKENS steps.
    answer = requests.post(f"{server.url}{CHAT}", json=chat(server, stream=False), timeout=WAIT_S).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    after_full = wait_idle(server)
    full = after_full["sampling_steps"] - before["sampling_steps"]
    assert full >= MAX_TOKENS - 1

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.request("POST", CHAT, json.dumps(chat(server, stream=True)), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:  # the opening chunk and two with text
        line = response.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data: ")
    response.close()
    conn.close()  # hang up with MAX_TOKENS - 2 tokens to go

    after = wait_idle(server)
    assert after["sampling_rows"] == 0
    assert after["sampling_cancelled"] == after_full["sampling_cancelled"] + 1
    assert after["sampling_steps"] - after_full["sampling_steps"] < full // 2


@pytest.mark.e2e
def test_a_wait_that_times_out_cancels_its_rows(impatient_server):
    server = impatient_server
    before = wait_idle(server)
    answer = requests.post(f"{server.url}{CHAT}", json=chat(server, stream=False), timeout=WAIT_S)
    assert answer.status_code == 500
    assert "did not finish within" in answer.json()["error"]["message"]
    after = wait_idle(server)  # its job ends (cancelled) instead of running MAX_TOKENS steps
    assert after["sampling_rows"] == 0
    assert after["sampling_steps"] - before["sampling_steps"] < MAX_TOKENS // 2


# ---- in process: the OpenAI layer's cancel handle ------------------------------------------------


@pytest.mark.unit
def test_cancel_reaches_the_engine_future_whether_it_comes_before_or_after_it():
    from concurrent.futures import Future

    early, late = Cancel(), Cancel()
    early()  # the client left before the pool ran the job
    first = Future()
    early.attach(first)
    assert early.requested and first.cancelled()

    second = Future()
    late.attach(second)
    assert not second.cancelled()
    late()
    assert second.cancelled()
    late()  # twice: nothing more

    done = Future()
    done.set_result([])
    finished = Cancel()
    finished.attach(done)
    finished()  # after the rows finished: nothing to cancel
    assert not done.cancelled()
