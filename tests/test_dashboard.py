"""The dashboard over HTTP: the page and its assets, the state it polls (adapters with their
steps, tokens, loss and loss points; recent requests; throughput), incremental polling with
``since``, and, with API keys on, a public page whose data only its key's owner sees."""

from __future__ import annotations

import math
import re
import threading
from types import SimpleNamespace

import pytest
import requests

from client_example import TinkerClient
from thinker.http.dashboard import ASSETS_DIR, Activity
from worker_pool import BatchLimits, WorkerPool

ALICE, BOB = "tml-alice-key-1", "tml-bob-key-22"
CHAT = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}]]


def state(server, key: str | None = None, **params) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return requests.get(f"{server.url}/dashboard/state", params=params, headers=headers, timeout=30)


def adapter_in(answer: dict, model_id: str) -> dict:
    found = [a for a in answer["adapters"] if a["model_id"] == model_id]
    assert found, f"{model_id} not in {[a['model_id'] for a in answer['adapters']]}"
    return found[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/", "text/html"),
        ("/dashboard/assets/dashboard.js", "text/javascript"),
        ("/dashboard/assets/dashboard.css", "text/css"),
        ("/dashboard/assets/favicon.svg", "image/svg+xml"),
    ],
)
def test_page_and_assets_are_served_with_their_types(server, path, media_type):
    response = requests.get(server.url + path, timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == media_type
    # Only the page's own files may run: nothing rendered from data can become a script.
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    if path == "/":
        for asset in ("dashboard.js", "dashboard.css"):
            assert f"/dashboard/assets/{asset}" in response.text
        assert "https://" not in response.text and "http://" not in response.text  # no CDN


@pytest.mark.e2e
@pytest.mark.parametrize(
    "name", ["missing.js", "index.html", "..%2Fapp.py", "%2e%2e%2fapp.py", ".hidden.js", "dashboard.py"]
)
def test_only_the_listed_assets_are_served(server, name):
    response = requests.get(f"{server.url}/dashboard/assets/{name}", timeout=30)
    assert response.status_code == 404
    assert response.json()["type"] == "NotFoundError"


@pytest.mark.e2e
def test_state_shows_an_adapter_training(server, client: TinkerClient):
    model_id = client.create_lora(rank=4, seed=7)
    losses = [client.train_step(model_id, CHAT, learning_rate=1e-2)["loss"] for _ in range(3)]
    answer = state(server).json()

    assert answer["keys"] is False
    assert answer["server"]["base_model"] == "builtin-tiny"
    assert answer["server"]["device"] == "cpu"
    assert answer["server"]["workers"] == 4
    assert 0 <= answer["server"]["busy_workers"] <= answer["server"]["workers"]
    assert 1 <= answer["server"]["adapters_resident"] <= answer["server"]["adapters_loaded"]
    assert answer["adapters_total"] >= 1
    assert answer["adapters"][0]["model_id"] == model_id  # the most recently active first
    mine = adapter_in(answer, model_id)
    assert mine["rank"] == 4 and mine["step"] == 3 and mine["tokens_trained"] > 0
    assert math.isclose(mine["last_loss"], losses[-1], rel_tol=1e-4)
    # One point per training forward-backward: (time, step it was taken at, loss)
    assert [p[1] for p in mine["points"]] == [0, 1, 2]
    assert all(math.isclose(p[2], loss, rel_tol=1e-4) for p, loss in zip(mine["points"], losses, strict=True))
    assert mine["points_left_out"] == 0

    recent = [r for r in answer["recent_requests"] if r["model_id"] == model_id]
    assert {r["kind"] for r in recent} >= {"fwdbwd", "optim_step"}
    assert all(r["status"] == "completed" and r["latency_ms"] >= r["queued_ms"] >= 0 for r in recent)
    assert answer["throughput"]["requests_per_s"] > 0 and answer["throughput"]["tokens_per_s"] > 0
    assert answer["queue"]["total"] >= 0

    # Polling with ``since`` sends only what is new.
    later = adapter_in(state(server, since=answer["server_time"]).json(), model_id)
    assert later["points"] == [] and later["points_left_out"] == 3
    client.train_step(model_id, CHAT, learning_rate=1e-2)
    later = adapter_in(state(server, since=answer["server_time"]).json(), model_id)
    assert [p[1] for p in later["points"]] == [3] and later["step"] == 4


@pytest.mark.e2e
def test_limit_keeps_the_most_recently_active(server, client: TinkerClient):
    first, second = client.create_lora(rank=2), client.create_lora(rank=2)
    client.train_step(first, CHAT)
    answer = state(server, limit=1).json()
    assert [a["model_id"] for a in answer["adapters"]] == [first]
    assert answer["adapters_total"] >= 2
    assert second in {a["model_id"] for a in state(server, limit=200).json()["adapters"]}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "-1"}, "since"),
        ({"since": "nan"}, "since"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_bad_parameters_are_400(server, params, named):
    response = state(server, **params)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{named}:")


@pytest.mark.e2e
@pytest.mark.slow
def test_with_keys_each_owner_sees_only_their_own(start_server):
    keyed = start_server(THINKER_API_KEYS=f"{ALICE},{BOB}")
    # The page and its assets are public; the data is not.
    assert requests.get(keyed.url + "/", timeout=30).status_code == 200
    assert requests.get(keyed.url + "/dashboard/assets/dashboard.js", timeout=30).status_code == 200
    assert state(keyed).status_code == 401
    assert state(keyed, "tml-not-a-key").status_code == 401

    with TinkerClient(keyed.url, api_key=ALICE) as alice, TinkerClient(keyed.url, api_key=BOB) as bob:
        alice_model = alice.create_lora(rank=4)
        alice.train_step(alice_model, CHAT)
        bob_model = bob.create_lora(rank=8)

    seen_by_bob = state(keyed, BOB).json()
    seen_by_alice = state(keyed, ALICE).json()
    assert seen_by_bob["keys"] is True and seen_by_bob["owner"].startswith("user-")
    assert seen_by_bob["owner"] != seen_by_alice["owner"]
    assert [a["model_id"] for a in seen_by_bob["adapters"]] == [bob_model]
    assert [a["model_id"] for a in seen_by_alice["adapters"]] == [alice_model]
    assert seen_by_bob["adapters_total"] == 1
    assert alice_model not in {r["model_id"] for r in seen_by_bob["recent_requests"]}
    assert {r["kind"] for r in seen_by_bob["recent_requests"]} == {"add_lora"}
    assert {r["kind"] for r in seen_by_alice["recent_requests"]} == {"add_lora", "fwdbwd", "optim_step"}
    assert adapter_in(seen_by_alice, alice_model)["step"] == 1
    # Server-wide figures are the same for both; per-user ones are their own.
    assert seen_by_bob["server"]["base_model"] == seen_by_alice["server"]["base_model"] == "builtin-tiny"
    assert seen_by_bob["queue"]["yours"] == 0


def _finished(kind: str, at: float, tokens: int = 0, owner: str = "local") -> SimpleNamespace:
    return SimpleNamespace(
        id=f"future_{at}", kind=kind, key="base_lora_x", owner=owner, status="completed",
        result={"num_tokens": tokens} if kind == "fwdbwd" else {}, error_type=None,
        submitted_at=at - 0.5, started_at=at - 0.25, finished_at=at,
    )


@pytest.mark.unit
def test_activity_throughput_counts_the_last_window_only():
    activity = Activity(window_s=60)
    activity.started_at = 1000.0
    activity.record(_finished("fwdbwd", 1010.2, tokens=500))  # leaves the window by t=1100
    for t in (1090.1, 1090.7, 1095.0):
        activity.record(_finished("fwdbwd", t, tokens=100))
    activity.record(_finished("optim_step", 1095.5))
    figures = activity.throughput(now=1100.0)
    assert figures["requests_per_s"] == pytest.approx(4 / 60, abs=1e-3)
    assert figures["tokens_per_s"] == pytest.approx(300 / 60, abs=0.1)
    assert figures["series"] == [[1090, 2, 200], [1095, 2, 100]]
    # A server younger than the window divides by its age.
    young = Activity(window_s=60)
    young.started_at = 1090.0
    young.record(_finished("fwdbwd", 1095.0, tokens=100))
    assert young.throughput(now=1100.0)["tokens_per_s"] == pytest.approx(10.0)

    recent = activity.recent(lambda owner: owner == "local", limit=2)
    assert [r["kind"] for r in recent] == ["optim_step", "fwdbwd"]
    assert recent[0]["latency_ms"] == pytest.approx(500) and recent[0]["queued_ms"] == pytest.approx(250)
    assert activity.recent(lambda owner: owner == "someone else") == []


def _state_of(pool: WorkerPool) -> dict:
    """GET /dashboard/state from an app holding only ``pool`` and an empty stand-in backend."""
    from flask import Flask, g

    from thinker.http import auth, dashboard

    info = {"base_model": "m", "device": "cpu", "dtype": "float32", "context_length": 64, "adapters": 0,
            "adapters_resident": 0}
    backend = SimpleNamespace(adapters=SimpleNamespace(all=list), sampler=None, name="HF", info=lambda: info)
    app = Flask(__name__)
    app.extensions["thinker"] = SimpleNamespace(backend=backend, pool=pool)
    app.before_request(lambda: setattr(g, "owner", auth.OPEN_OWNER))  # open mode, as auth.install sets it
    app.register_blueprint(dashboard.bp)
    response = app.test_client().get("/dashboard/state")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


@pytest.mark.unit
def test_busy_workers_count_threads_not_the_adapters_of_a_fused_pass():
    """Four adapters in one fused pass on two workers: one worker is busy (the page used to
    show "4 / 2", counting adapters as workers)."""
    entered, release = threading.Event(), threading.Event()

    def runner(payloads: list) -> list:
        entered.set()
        release.wait(30)
        return [{} for _ in payloads]

    pool = WorkerPool(2, runners={"fwdbwd": runner}, limits=BatchLimits(window_s=0.0))
    try:
        futures = pool.submit_many([(f"adapter_{i}", "fwdbwd", "fwdbwd", i, 1, 8) for i in range(4)])
        assert entered.wait(30), "the fused pass never started"
        server = _state_of(pool)["server"]
        assert server["running"] == 4  # adapters in the running pass: their own figure
        assert server["busy_workers"] == 1 and server["workers"] == 2
    finally:
        release.set()
        pool.shutdown()
    assert all(f.status == "completed" for f in futures)
    assert _state_of(pool)["server"]["busy_workers"] == 0
    # The page's "Workers busy / total" shows the busy threads, not the running adapters.
    script = (ASSETS_DIR / "dashboard.js").read_text()
    assert re.search(r'stat\("Workers", `\$\{s\.busy_workers\} / \$\{s\.workers\}`', script)
