"""EXECUTOR=ray end to end: a real server whose model runs on 2 Ray actors (CPU, builtin-tiny).

One server (its own local Ray cluster, started and stopped with it) serves the whole module,
so the lane stays within its budget; the tests that change the cluster (kill, add, drain) come
last. The same requests against an EXECUTOR=local server give the same losses and samples.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import tinker
from tinker import types

from client_example import TinkerClient
from tests.conftest import ServerProcess
from thinker.core.errors import NotFoundError, RequestFailedError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ALICE, BOB, CAROL, ADMIN, SDK = "tml-alice-key", "tml-bob-key", "tml-carol-key", "tml-admin-key", "tml-test-key"
KEYS = ",".join([ALICE, BOB, CAROL, ADMIN, SDK])
CHAT = [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]]
TIMEOUT_S = 120.0  # a future that takes longer has hung


STARTUP_S = 300.0  # Ray, then 2 workers loading the model: ~30-60 s, far more on a busy shared machine


@pytest.fixture(scope="module")
def cluster(cache_dir, tmp_path_factory):
    env = {
        "BASE_MODEL": "builtin-tiny", "THINKER_CACHE_DIR": str(cache_dir),
        "THINKER_DATA_DIR": str(tmp_path_factory.mktemp("ray-data")), "EXECUTOR": "ray", "WORKERS": "2",
        "THINKER_API_KEYS": KEYS, "ADMIN_API_KEYS": ADMIN, "AUTOSAVE_EVERY_STEPS": "1", "MAX_WORKERS": "4",
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("ray-log") / "server.log")
    try:
        server.wait_ready(STARTUP_S)
        yield server
    finally:
        server.stop()  # SIGTERM: the server stops its workers and its local Ray instance


def client(server, key: str) -> TinkerClient:
    return TinkerClient(server.url, api_key=key, timeout=TIMEOUT_S)


def admin(server, method: str, path: str = "") -> dict:
    answer = requests.request(method, f"{server.url}/admin/workers{path}", headers={"X-API-Key": ADMIN},
                              timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


def train(c: TinkerClient, model_id: str, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(c.wait_for_result(c.fwdbwd(model_id, CHAT), TIMEOUT_S)["loss"])
        c.wait_for_result(c.optim_step(model_id, learning_rate=1e-2), TIMEOUT_S)
    return losses


def session(server, key: str, seed: int) -> tuple[list[float], list[str]]:
    """The same work on any server: an adapter from ``seed``, 3 steps, a seeded sample."""
    with client(server, key) as c:
        model_id = c.create_lora("builtin-tiny", rank=4, seed=seed, timeout=TIMEOUT_S)
        losses = train(c, model_id, 3)
        sample = c.sample(model_id, ["Hi", "Name a colour."], max_tokens=12, temperature=0.8, seed=seed)
        return losses, [o["text"] if isinstance(o, dict) else o for o in sample["outputs"]]


def placed(server) -> dict[str, int]:
    return {w["name"]: w["adapters_placed"] for w in admin(server, "GET")["workers"]}


def where(server, model_id: str) -> str:
    """The worker an adapter is placed on (the admin view lists them)."""
    return next(w["name"] for w in admin(server, "GET")["workers"] if model_id in w["adapter_ids"])


def step_of(server, key: str, model_id: str) -> int:
    listed = requests.get(f"{server.url}/adapters", headers={"X-API-Key": key}, timeout=30).json()["adapters"]
    return next(a["step"] for a in listed if a["model_id"] == model_id)


def test_health_shows_the_workers(cluster):
    workers = requests.get(f"{cluster.url}/healthz", timeout=30).json()["model_workers"]
    assert [w["name"] for w in workers] == ["w0", "w1"]
    assert all(w["state"] == "up" and w["device"] == "cpu" for w in workers)
    assert len({w["pid"] for w in workers}) == 2  # two processes, one model each
    metrics = requests.get(f"{cluster.url}/metrics", timeout=30).text
    assert 'thinker_cluster_worker_up{worker="w1"} 1.0' in metrics
    dashboard = requests.get(f"{cluster.url}/dashboard/state", headers={"X-API-Key": ALICE}, timeout=30).json()
    assert [(w["name"], w["adapters_placed"], w["busy"]) for w in dashboard["workers"]] == [("w0", 0, False),
                                                                                             ("w1", 0, False)]
    assert requests.get(f"{cluster.url}/admin/workers", headers={"X-API-Key": ALICE}, timeout=30).status_code == 401


def test_seed_api_end_to_end_and_users_isolated_on_different_workers(cluster):
    with client(cluster, ALICE) as alice, client(cluster, BOB) as bob:
        a = alice.wait_for_result(alice.add_lora("builtin-tiny", rank=4, seed=1), TIMEOUT_S)
        b = bob.wait_for_result(bob.add_lora("builtin-tiny", rank=4, seed=1), TIMEOUT_S)
        assert a["worker"] != b["worker"]  # least loaded: two users, two workers
        with ThreadPoolExecutor(2) as pool:  # both train at once, each on its worker
            la, lb = pool.map(lambda cm: train(*cm, 3), [(alice, a["model_id"]), (bob, b["model_id"])])
        assert la == pytest.approx(lb, abs=1e-6)  # the same seed and data on another device
        assert la[-1] < la[0]
        with pytest.raises(NotFoundError):  # bob cannot see (or train) alice's adapter
            bob.fwdbwd(a["model_id"], CHAT)
        saved = alice.wait_for_result(alice.save_state(a["model_id"], "ckpt"), TIMEOUT_S)
        loaded = alice.wait_for_result(alice.load_state(saved["path"]), TIMEOUT_S)
        assert loaded["step"] == 3
        assert alice.wait_for_result(alice.save_lora(a["model_id"]), TIMEOUT_S)["step"] == 3
        out = alice.sample(loaded["model_id"], ["Hi"], max_tokens=8, seed=3)
        assert len(out["outputs"]) == 1


def test_same_seeds_give_the_same_losses_and_samples_as_local(cluster, start_server):
    on_ray = session(cluster, CAROL, seed=11)
    local = start_server(EXECUTOR="local", THINKER_API_KEYS=KEYS)
    try:
        on_local = session(local, CAROL, seed=11)
    finally:
        local.stop()
    assert on_ray[0] == pytest.approx(on_local[0], abs=1e-6)
    assert on_ray[1] == on_local[1]


def test_official_sdk_smoke(cluster, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=cluster.url, api_key=SDK)
    try:
        training = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=2).result()
        tokenizer = training.get_tokenizer()
        ids = tokenizer.encode("Hello there, how are you?", add_special_tokens=False)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        losses = []
        for _ in range(3):
            fwd = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(fwd.result().metrics["loss:sum"])
        assert losses[-1] < losses[0]
        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(ids[:4])
        out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=6, seed=5)).result()
        assert len(out.sequences) == 2
    finally:
        service.close("success").result()


def test_openai_completions_at_once_and_streamed_agree(cluster):
    url, headers = f"{cluster.url}/oai/api/v1/completions", {"Authorization": f"Bearer {CAROL}"}
    body = {"model": "builtin-tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    whole = requests.post(url, headers=headers, json=body, timeout=TIMEOUT_S).json()["choices"][0]["text"]
    raw = requests.post(url, headers=headers, json={**body, "stream": True}, stream=True, timeout=TIMEOUT_S)
    events = [line.removeprefix("data: ") for line in raw.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]" and len(events) > 3  # streamed: the tokens came in pieces
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]) == whole


def test_a_busy_sampler_checkpoint_is_spread_over_workers(cluster, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=cluster.url, api_key=SDK)
    try:
        training = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=3).result()
        path = training.save_weights_for_sampler("spread").result().path
        sampler = service.create_sampling_client(model_path=path).result()
        prompt, params = types.ModelInput.from_ints([5, 6, 7, 8]), types.SamplingParams(max_tokens=24, seed=4)
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # many requests at once: once each copy has 2 in flight, one more worker loads it
            answers = [f.result() for f in [sampler.sample(prompt, 1, params) for _ in range(12)]]
            # the same seed gives the same tokens whichever copy served it
            assert len({tuple(a.sequences[0].tokens) for a in answers}) == 1
            copies = [w["name"] for w in admin(cluster, "GET")["workers"]
                      if any("spread" in a for a in w["adapter_ids"])]
            if len(copies) == 2:
                break
            assert time.monotonic() < deadline, copies
    finally:
        service.close("success").result()


def test_killing_a_worker_fails_its_requests_clearly_and_training_goes_on(cluster):
    with client(cluster, ALICE) as alice, client(cluster, BOB) as bob:
        kept = alice.create_lora("builtin-tiny", rank=4, seed=5, timeout=TIMEOUT_S)
        train(alice, kept, 2)  # autosaved at step 2 (AUTOSAVE_EVERY_STEPS=1)
        fresh = alice.create_lora("builtin-tiny", rank=4, seed=6, timeout=TIMEOUT_S)  # never stepped: no autosave
        other = bob.create_lora("builtin-tiny", rank=4, seed=7, timeout=TIMEOUT_S)
        workers = {w["name"]: w for w in admin(cluster, "GET")["workers"]}
        victim = where(cluster, kept)
        assert where(cluster, fresh) == victim  # one user's adapters go together (they fuse)
        in_flight = [alice.fwdbwd(kept, CHAT) for _ in range(4)]
        os.kill(workers[victim]["pid"], signal.SIGKILL)
        for request_id in in_flight:  # each completes or fails saying why; none hangs
            try:
                alice.wait_for_result(request_id, TIMEOUT_S)
            except RequestFailedError as exc:
                assert "worker lost" in str(exc)
        # Back from its autosave on the other worker, at step 2, and it trains on.
        assert train(alice, kept, 1)
        assert step_of(cluster, ALICE, kept) == 3 and where(cluster, kept) != victim
        with pytest.raises(NotFoundError, match=rf"lost when its model worker {victim} died.*no checkpoint"):
            alice.fwdbwd(fresh, CHAT)
        train(bob, other, 1)  # bob's adapter (on the live worker or restored) is unaffected
        deadline = time.monotonic() + TIMEOUT_S  # Ray restarts the actor; it rejoins, empty
        while (w := {w["name"]: w for w in admin(cluster, "GET")["workers"]}[victim])["state"] != "up":
            assert time.monotonic() < deadline, w
            time.sleep(0.5)
        assert w["pid"] != workers[victim]["pid"]


def test_add_a_worker_then_drain_it_then_rebalance(cluster):
    for key in (ADMIN, SDK):  # every worker holds something (a restarted one rejoins empty) ...
        if 0 in placed(cluster).values():
            with client(cluster, key) as c:  # (a new user's adapter goes to the least loaded worker)
                c.create_lora("builtin-tiny", rank=4, seed=9, timeout=TIMEOUT_S)
    assert 0 not in placed(cluster).values()
    added = admin(cluster, "POST")["worker"]["name"]  # ... so the added, empty one is the least loaded
    assert placed(cluster)[added] == 0
    with client(cluster, CAROL) as carol:
        model_id = carol.create_lora("builtin-tiny", rank=4, seed=8, timeout=TIMEOUT_S)
        assert placed(cluster)[added] == 1  # the least loaded worker takes the new adapter
        before = train(carol, model_id, 2)
        drained = admin(cluster, "POST", f"/{added}/drain")
        assert drained["drained"] and drained["moved"][model_id] != added
        assert added not in placed(cluster)
        after = train(carol, model_id, 1)  # weights and optimizer state moved: training continues
        assert after[0] < before[-1]
        assert step_of(cluster, CAROL, model_id) == 3
        admin(cluster, "POST", "/rebalance")  # even out what the kill and the drain left
        counts = placed(cluster).values()
        assert max(counts) - min(counts) <= 1
        assert train(carol, model_id, 1)  # wherever it is now
