"""Shared fixtures: the built-in tiny model, an in-process backend, and a live server.

End-to-end tests talk to a real ``python app.py`` over HTTP on a free loopback port, on
builtin-tiny written into a per-session cache folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import tinker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import HFBackend, load_base_model  # noqa: E402
from backend.sample.engine import SamplingEngine  # noqa: E402
from client_example import TinkerClient  # noqa: E402
from thinker.core.config import Config  # noqa: E402

# Every test picks a lane, so `-m unit` (in process, seconds), `-m e2e` (a real server over
# HTTP) and `-m browser` together run everything; `slow` (tens of seconds: its own server, a
# restart, a soak, a model loaded in a subprocess) is added on top, so a quick run is
# `-m "not slow and not browser"`. `cookbook` runs tinker-cookbook's recipes against a server
# (tests/test_cookbook.py); `ray` runs EXECUTOR=ray on a local Ray cluster (tests/test_ray.py).
LANES = ("unit", "e2e", "browser", "cookbook", "ray")


def lane_errors(items) -> list[str]:
    """Node ids of the collected tests that are in no lane."""
    return [item.nodeid for item in items if not any(item.get_closest_marker(lane) for lane in LANES)]


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: a test without a lane fails every run
def pytest_collection_modifyitems(config, items) -> None:
    if missing := lane_errors(items):
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise pytest.UsageError(
            f"{len(missing)} tests are in no lane: mark each (or its module, with `pytestmark = pytest.mark.unit`) "
            f"unit, e2e or browser (see tests/conftest.py):\n  {listed}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("thinker-cache")


@pytest.fixture(scope="session")
def backend(cache_dir, tmp_path_factory) -> HFBackend:
    """builtin-tiny loaded in this process, for unit tests of the engine."""
    config = Config(base_model="builtin-tiny", thinker_cache_dir=str(cache_dir), device="cpu")
    return HFBackend(load_base_model(config), tmp_path_factory.mktemp("thinker-data"))


def train_adapters(
    backend: HFBackend, answers: list[str], ranks: list[int], alpha: float, seed: int, steps: int
) -> list[str]:
    """One adapter per answer (rank ``ranks[i]``, seed ``seed + i``), trained ``steps`` steps to
    answer "Hello!" with it: adapters that really differ, for sampling tests."""
    from backend import AdamParams, FwdBwdRequest

    ids = []
    for i, answer in enumerate(answers):
        adapter_id = backend.add_lora(ranks[i], alpha, None, seed + i)["model_id"]
        examples = backend.render_conversations(
            [[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": answer}]]
        )
        for _ in range(steps):
            backend.forward_backward([FwdBwdRequest(adapter_id, examples)])
            backend.optim_step(adapter_id, AdamParams(learning_rate=5e-3))
        ids.append(adapter_id)
    return ids


def engine_for(backend: HFBackend, **settings) -> SamplingEngine:
    """A shared decode loop over ``backend``'s model (``settings``: SamplingEngine's own)."""
    return SamplingEngine(
        backend.model, backend.tokenizer, backend.eos_ids, backend.loaded.context_length, backend.device, **settings
    )


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env.get("PORT") or free_port())  # PORT: restart where clients already point
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = env  # what it was started with (THINKER_DATA_DIR, ...)
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def log_when(self, text: str, timeout: float = 30.0) -> str:
        """The log once ``text`` is in it: the server writes its records from a thread of its
        own (thinker/obs/logs.py), so a line can land just after the answer that caused it."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def stop(self) -> None:
        self.proc.terminate()
        self.wait_stopped()

    def wait_stopped(self) -> None:
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(cache_dir, tmp_path_factory):
    """Start ``python app.py`` with extra environment variables; stopped at session end."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        env = {"BASE_MODEL": "builtin-tiny", "THINKER_CACHE_DIR": str(cache_dir), **env}
        env.setdefault("THINKER_DATA_DIR", str(tmp_path_factory.mktemp("server-data")))
        # A fixed team: the default (auto) resizes it with the machine's load, and 1 and 2
        # threads sum in another order, so two equal computations could differ in the last
        # bits; tests compare results exactly (test_threads.py starts an auto server).
        env.setdefault("TORCH_THREADS", "1")
        server = ServerProcess(env, tmp_path_factory.mktemp("server-log") / "server.log")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:  # SIGTERM to all first: they drain at the same time
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in started:
        server.wait_stopped()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared live server on builtin-tiny (4 workers)."""
    return start_server(MAX_WORKERS="4")


@pytest.fixture
def client(server) -> TinkerClient:
    with TinkerClient(server.url) as c:
        yield c


# The official tinker SDK against the shared server (tests/test_tinker_*.py).
@pytest.fixture(scope="module")
def service(server, monkeypatch_module):
    """A tinker.ServiceClient on the shared server."""
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test-key")
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def training(service):
    return service.create_lora_training_client(base_model="builtin-tiny", rank=8, seed=1).result()
