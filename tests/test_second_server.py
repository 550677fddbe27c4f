"""Server lifecycle edges: a second ``python app.py`` on a data dir or port already in use
exits 2 with one clear line before it loads or recovers anything (the first server is
untouched), and a submission while SIGTERM drains gets 503 + Retry-After, not 500."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHAT = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
LOADING = "Initializing HuggingFace backend"  # the first line create_app logs, before the model loads


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=60)


def run(server, path: str, body: dict) -> dict:
    """Submit and wait: the finished future."""
    queued = post(server, path, body).json()
    return post(server, "/retrieve_future", {"request_id": queued["request_id"], "timeout": 30}).json()


def second_server(cache_dir: Path, **env: str) -> tuple[int, list[str]]:
    """Run another ``python app.py``; its exit code and its output lines."""
    full_env = {
        **os.environ, "BASE_MODEL": "builtin-tiny", "THINKER_CACHE_DIR": str(cache_dir), "HOST": "127.0.0.1", **env
    }
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the second server kept running:\n{out}")
    return proc.returncode, [line for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first(start_server):
    return start_server()


def test_second_server_on_the_same_data_dir_exits_and_leaves_the_first_alone(first, cache_dir):
    adapter = run(first, "/add_lora", {"rank": 4, "alpha": 8.0})["result"]["model_id"]
    data_dir = Path(first.env["THINKER_DATA_DIR"])
    # Unfinished when the second one starts: recovery would mark it failed in the database.
    slow = {
        "base_model": adapter,
        "num_samples": 4,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    in_flight = post(first, "/api/v1/asample", slow).json()["request_id"]

    code, lines = second_server(cache_dir, THINKER_DATA_DIR=str(data_dir), PORT=str(free_port()))

    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "THINKER_DATA_DIR" in lines[0] and "in use" in lines[0] and str(first.proc.pid) in lines[0]
    with sqlite3.connect(f"file:{data_dir / 'thinker.db'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT state FROM adapters WHERE model_id = ?", (adapter,)).fetchone() == ("live",)
        (status, error) = db.execute("SELECT status, error FROM futures WHERE id = ?", (in_flight,)).fetchone()
    assert status != "failed", error
    # The first server's adapter still trains.
    assert run(first, "/fwdbwd", {"model_id": adapter, "data": CHAT})["status"] == "completed"
    assert run(first, "/optim_step", {"model_id": adapter})["status"] == "completed"
    assert adapter in [a["model_id"] for a in requests.get(f"{first.url}/adapters", timeout=30).json()["adapters"]]


def test_second_server_on_the_same_port_exits_before_loading(first, cache_dir, tmp_path):
    other_data = tmp_path / "other-data"
    code, lines = second_server(cache_dir, THINKER_DATA_DIR=str(other_data), PORT=str(first.port))

    assert code == 2, lines
    assert len(lines) == 1, lines
    assert f"port {first.port}" in lines[0] and "in use" in lines[0]
    assert not (other_data / "thinker.db").exists()  # nothing loaded, created or recovered
    assert LOADING in first.log() and requests.get(f"{first.url}/healthz", timeout=30).status_code == 200


def test_a_submission_while_draining_gets_503_with_retry_after(start_server):
    server = start_server()
    adapter = run(server, "/add_lora", {"rank": 4, "alpha": 8.0})["result"]["model_id"]
    slow = {
        "base_model": adapter,
        "num_samples": 4,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    post(server, "/api/v1/asample", slow)
    deadline = time.monotonic() + 60
    while requests.get(f"{server.url}/healthz", timeout=30).json()["running"] < 1:  # the job is running
        assert time.monotonic() < deadline, "the sample never started"

    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while (answer := post(server, "/add_lora", {"rank": 4, "alpha": 8.0})).status_code == 200:
        assert time.monotonic() < deadline, "the server kept taking new work after SIGTERM"

    assert answer.status_code == 503, answer.text
    assert answer.json()["type"] == "ServiceUnavailableError" and "shutting down" in answer.json()["error"]
    assert int(answer.headers["Retry-After"]) > 0
    assert server.proc.wait(timeout=120) == 0
