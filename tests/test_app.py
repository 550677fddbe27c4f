"""Starting the server: log lines, the offline fallback, and refusals to start."""

from __future__ import annotations

import os
import subprocess
import sys

import requests

from tests.conftest import ROOT


def test_startup_logs_match_the_seed_server(server):
    log = server.log()
    for line in (
        "Initializing HuggingFace backend...",
        "Loading base model from builtin-tiny...",
        "Worker pool size: 4 threads",
        "Worker pool initialized. Concurrent job processing: Enabled (HF)",
        "Base model loaded on cpu",
    ):
        assert line in log
    assert log.index("Initializing") < log.index("Worker pool size") < log.index("Base model loaded")
    assert "waitress" in log.lower() or "Serving on" in log  # not Flask's development server
    assert "development server" not in log


def test_default_model_unavailable_falls_back_to_builtin_tiny_loudly(start_server, tmp_path):
    server = start_server(BASE_MODEL="", HF_HOME=str(tmp_path / "empty-hf-home"), HF_HUB_OFFLINE="1", MAX_WORKERS="2")
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert health["base_model"] == "builtin-tiny"
    assert "SmolLM2-135M-Instruct" in health["fallback_reason"]
    assert health["workers"] == 2
    log = server.log()
    assert "WARNING" in log and "FALLING BACK" in log
    assert "Loading base model from HuggingFaceTB/SmolLM2-135M-Instruct..." in log


def _run_app(env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PORT": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_megatron_is_refused_clearly():
    result = _run_app({"USE_MEGATRON": "true", "BASE_MODEL": "builtin-tiny"})
    assert result.returncode != 0
    assert "no Megatron backend" in result.stderr


def test_malformed_settings_are_refused():
    result = _run_app({"MAX_WORKERS": "many"})
    assert result.returncode != 0 and "MAX_WORKERS" in result.stderr
