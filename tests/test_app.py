"""Starting the server: log lines, the offline fallback, and refusals to start."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

# The seed server's start-up lines (its README shows them), with what each reports captured.
STARTUP_LINES = [
    ("init", r"Initializing HuggingFace backend\.\.\."),
    ("model", r"Loading base model from (?P<model>\S+)\.\.\."),
    ("workers", r"Worker pool size: (?P<workers>\d+) threads"),
    ("backend", r"Worker pool initialized\. Concurrent job processing: Enabled \((?P<backend>\w+)\)"),
    ("device", r"Base model loaded on (?P<device>\w+)"),
]


def startup_report(log: str) -> dict[str, str]:
    """What the seed-style start-up lines say, checking they come in the seed's order."""
    found, positions = {}, []
    for name, pattern in STARTUP_LINES:
        match = re.search(pattern, log)
        assert match, f"no {name} line ({pattern}) in:\n{log}"
        positions.append(match.start())
        found.update(match.groupdict())
    assert positions == sorted(positions), "the start-up lines are out of order"
    return found


def test_startup_lines_report_what_the_server_runs(server):
    report = startup_report(server.log())
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert report["workers"] == str(health["workers"])  # another MAX_WORKERS: see the fallback test
    assert report["model"] == health["base_model"]
    assert report["backend"] == health["backend"]
    assert report["device"] == health["device"].split(":")[0]
    log = server.log()
    assert "waitress" in log.lower() or "Serving on" in log  # not Flask's development server
    assert "development server" not in log


@pytest.mark.slow
def test_default_model_unavailable_falls_back_to_builtin_tiny_loudly(start_server, tmp_path):
    server = start_server(BASE_MODEL="", HF_HOME=str(tmp_path / "empty-hf-home"), HF_HUB_OFFLINE="1", MAX_WORKERS="2")
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert health["base_model"] == "builtin-tiny"
    assert "SmolLM2-135M-Instruct" in health["fallback_reason"]
    assert health["workers"] == 2
    log = server.log()
    assert "WARNING" in log and "FALLING BACK" in log
    report = startup_report(log)
    assert report["workers"] == "2"  # the line follows MAX_WORKERS
    assert report["model"] in health["fallback_reason"]  # it first tried the default model, and says so


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
