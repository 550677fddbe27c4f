"""The client walkthrough, the examples and the load-test script, run as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_script(server, *args: str, via_env: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    argv = [sys.executable, *args]
    if via_env:
        env["BASE_URL"] = server.url
    else:
        argv += ["--url", server.url]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_client_walkthrough(server):
    result = run_script(server, "client_example.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised BadRequestError" in result.stdout and "raised NotFoundError" in result.stdout


def test_simple_concurrent_example(server):
    result = run_script(server, "example_simple_concurrent.py", via_env=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("Alice", "Bob", "Carol"):
        assert re.search(rf"\[{name}\] ✓ Created adapter: base_lora_[0-9a-f]+", result.stdout)
    assert "SUMMARY" in result.stdout and "✓ All 3 users completed training!" in result.stdout
    assert re.search(r"✓ Total time: \d+\.\d+ seconds", result.stdout)


def test_concurrent_users_example(server):
    result = run_script(server, "example_concurrent_users.py", "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[\d\d:\d\d:\d\d\.\d{3}\] Alice: ", result.stdout)
    assert "Step 2" in result.stdout and "\x1b[" not in result.stdout  # NO_COLOR honoured


@pytest.mark.parametrize("users", ["3"])
def test_load_test_script(server, users):
    result = run_script(server, "test_concurrent_users.py", users, "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "RESULTS SUMMARY" in out and f"Total users: {users}" in out
    assert f"Successful: {users}" in out and "Failed: 0" in out
    assert len(re.findall(r"✓ user_\d+: \d+\.\d+s \(model: base_lora_[0-9a-f]+\)", out)) == int(users)
    assert re.search(r"Concurrency speedup: \d+\.\d+x", out)
    assert re.search(r"\(Estimated sequential time: \d+\.\d+s vs actual: \d+\.\d+s\)", out)


def test_scripts_fail_clearly_without_a_server():
    result = subprocess.run(
        [sys.executable, "test_concurrent_users.py", "2", "--url", "http://127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "python app.py" in result.stdout + result.stderr
