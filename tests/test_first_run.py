"""First-run mistakes end in one clear line and exit status 2, without loading anything.

A newcomer's typos (a missing folder, a hub id on an offline machine, ``DEVICE=gpu``, a URL
without its scheme) must not end in a traceback or minutes of hub retries.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


def run_app(tmp_path, **env: str) -> subprocess.CompletedProcess:
    import os

    full_env = {
        **os.environ,
        "PORT": str(free_port()),
        "THINKER_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",  # this machine is offline anyway; say so, as a newcomer's might not
        **env,
    }
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"BASE_MODEL": "/nonexistent/dir"}, "folder not found"),
        ({"BASE_MODEL": "./no/such/folder"}, "folder not found"),
        ({"BASE_MODEL": "someone/not-cached-model"}, "not in the local Hugging Face cache"),
        ({"DEVICE": "gpu"}, "DEVICE='gpu' is not a device"),
        ({"DEVICE": "cuda", "BASE_MODEL": "builtin-tiny"}, "DEVICE=cuda but"),
        ({"COMPUTE_CPUS": "1-x"}, "COMPUTE_CPUS must be a CPU list"),
        ({"COMPUTE_CPUS": "4096", "BASE_MODEL": "builtin-tiny"}, "COMPUTE_CPUS=4096 names CPUs this process may"),
    ],
)
def test_bad_start_settings_end_in_one_line_and_exit_2(tmp_path, env, says):
    if env.get("DEVICE") == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so DEVICE=cuda is valid here")
    done = run_app(tmp_path, **env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line or line.startswith("error")]
    assert len(errors) == 1 and says in errors[0], output
    assert "Traceback" not in output
    assert "Loading weights" not in output  # refused before any weight was read


def test_an_existing_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_app(tmp_path, BASE_MODEL=str(tmp_path / "empty"))
    assert done.returncode == 2
    assert "has no config.json" in done.stdout + done.stderr


@pytest.mark.parametrize("script", ["client_example.py", "example_simple_concurrent.py", "test_concurrent_users.py"])
def test_a_url_without_scheme_is_refused_in_one_line(script):
    done = subprocess.run(
        [sys.executable, script, "--url", "localhost:8000"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: server URL 'localhost:8000' must start with http:// or https:// and name a host: http://localhost:8000"
    ]


def test_https_against_a_plain_http_server_says_so(server):
    from client_example import TinkerClient

    url = server.url.replace("http://", "https://")
    with TinkerClient(url) as client, pytest.raises(ConnectionError, match="plain-HTTP server"):
        client.healthz()
