"""API keys and ownership on a live server with two users, alice and bob.

Without a valid key every endpoint but the public ones answers 401; with one, a user sees
only what they created: the other's adapters, futures, checkpoints, sessions and samplers
answer 404, worded as for things that do not exist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import tinker
from tinker import types

from thinker import keys as keys_cli
from thinker.core.config import Config
from thinker.core.errors import ConfigurationError
from thinker.http.auth import KeyRing
from thinker.store.database import Database

ALICE, BOB = "tml-alice-0001", "tml-bob-000002"
CHAT = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(THINKER_API_KEYS=f"{ALICE},{BOB}")


def call(server, method: str, path: str, key: str | None = None, bearer: bool = False, **kwargs):
    headers = {}
    if key:
        headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    return requests.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kwargs)


def wait(server, key: str, request_id: str) -> dict:
    return call(server, "POST", "/retrieve_future", key, json={"request_id": request_id, "timeout": 30}).json()


@pytest.fixture(scope="module")
def alice_adapter(keyed) -> str:
    queued = call(keyed, "POST", "/add_lora", ALICE, json={"rank": 4, "alpha": 8.0}).json()
    return wait(keyed, ALICE, queued["request_id"])["result"]["model_id"]


@pytest.fixture(scope="module")
def alice_sdk(keyed, monkeypatch_module):
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    service = tinker.ServiceClient(base_url=keyed.url, api_key=ALICE)
    training = service.create_lora_training_client(base_model="builtin-tiny", rank=4, seed=3).result()
    checkpoint = training.save_state("mine").result().path
    sampler = training.save_weights_and_get_sampling_client().result()
    yield {"service": service, "training": training, "checkpoint": checkpoint, "sampler": sampler}
    service.close("success").result()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.e2e
@pytest.mark.slow
def test_keys_are_required_except_on_public_paths(keyed):
    assert call(keyed, "GET", "/healthz").status_code == 200
    for method, path in [("GET", "/adapters"), ("POST", "/add_lora"), ("POST", "/api/v1/create_session"),
                         ("GET", "/api/v1/training_runs"), ("POST", "/api/v1/retrieve_future")]:
        for key in (None, "tml-not-a-key"):
            response = call(keyed, method, path, key, json={})
            assert response.status_code == 401, (method, path, key)
            assert response.json()["type"] == "AuthenticationError"
    assert call(keyed, "GET", "/adapters", ALICE, bearer=True).status_code == 200
    assert call(keyed, "GET", "/adapters", ALICE).status_code == 200


@pytest.mark.e2e
@pytest.mark.slow
def test_seed_api_resources_are_private(keyed, alice_adapter):
    queued = call(keyed, "POST", "/fwdbwd", ALICE, json={"model_id": alice_adapter, "data": CHAT}).json()
    assert wait(keyed, ALICE, queued["request_id"])["status"] == "completed"
    missing = "base_lora_000000000000"
    bodies = {
        "/fwdbwd": {"data": CHAT},
        "/optim_step": {},
        "/save_lora": {},
        "/api/v1/sample": {"prompts": ["hi"], "sampling_params": {"max_tokens": 2}},
    }
    for path, body in bodies.items():
        theirs = call(keyed, "POST", path, BOB, json={"model_id": alice_adapter, **body})
        nothing = call(keyed, "POST", path, BOB, json={"model_id": missing, **body})
        assert theirs.status_code == nothing.status_code == 404, path
        assert theirs.json()["error"] == nothing.json()["error"].replace(missing, alice_adapter)
    stolen = call(keyed, "POST", "/retrieve_future", BOB, json={"request_id": queued["request_id"]})
    assert stolen.status_code == 404
    assert alice_adapter not in str(call(keyed, "GET", "/adapters", BOB).json())
    assert alice_adapter in str(call(keyed, "GET", "/adapters", ALICE).json())


@pytest.mark.e2e
@pytest.mark.slow
def test_tinker_resources_are_private(keyed, alice_sdk):
    training, path = alice_sdk["training"], alice_sdk["checkpoint"]
    model_id = training.get_info().model_id
    session_id = model_id.split(":train:")[0]
    run = path.removeprefix("tinker://").split("/")[0]
    bob = tinker.ServiceClient(base_url=keyed.url, api_key=BOB)
    bob_rest = tinker.RestClient(base_url=keyed.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=path).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(run).result()
    assert run not in [r.training_run_id for r in bob_rest.list_training_runs().result().training_runs]
    assert bob_rest.list_user_checkpoints().result().checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(path).result()

    api = "/api/v1"
    queued = call(keyed, "POST", f"{api}/optim_step", ALICE, json={"model_id": model_id, "seq_id": 0}).json()
    sampler_id = call(keyed, "GET", f"{api}/sessions/{session_id}", ALICE).json()["sampler_ids"][0]
    prompt = {"chunks": [{"tokens": [1]}]}
    raw = [
        ("POST", f"{api}/get_info", {"model_id": model_id}),
        ("POST", f"{api}/optim_step", {"model_id": model_id}),
        ("POST", f"{api}/save_weights", {"model_id": model_id, "path": "stolen"}),
        ("POST", f"{api}/save_weights_for_sampler", {"model_id": model_id, "path": "stolen"}),
        ("POST", f"{api}/load_weights", {"model_id": model_id, "path": path}),
        ("POST", f"{api}/retrieve_future", {"request_id": queued["request_id"]}),
        ("POST", f"{api}/session_heartbeat", {"session_id": session_id}),
        ("POST", f"{api}/create_model", {"session_id": session_id, "model_seq_id": 0, "base_model": "builtin-tiny"}),
        ("POST", f"{api}/create_sampling_session", {"session_id": session_id, "sampling_session_seq_id": 0,
                                                   "base_model": "builtin-tiny"}),
        ("POST", f"{api}/asample", {"sampling_session_id": sampler_id, "seq_id": 5, "prompt": prompt}),
        ("GET", f"{api}/samplers/{sampler_id}", None),
        ("GET", f"{api}/sessions/{session_id}", None),
        ("GET", f"{api}/training_runs/{run}/checkpoints/weights/mine/archive", None),
        ("GET", f"{api}/training_runs/{run}/checkpoints/weights/mine/external_weights_urls", None),
        ("DELETE", f"{api}/training_runs/{run}/checkpoints/weights/mine", None),
    ]
    for method, path_, body in raw:
        response = call(keyed, method, path_, BOB, json=body)
        assert response.status_code == 404, (method, path_, response.status_code, response.text)
    assert session_id not in call(keyed, "GET", f"{api}/sessions", BOB).json()["sessions"]
    # Alice still has everything.
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    assert "loss:sum" in training.forward([datum], "cross_entropy").result().metrics
    alice_rest = tinker.RestClient(base_url=keyed.url, api_key=ALICE)
    assert "weights/mine" in [c.checkpoint_id for c in alice_rest.list_checkpoints(run).result().checkpoints]


@pytest.mark.unit
def test_keys_file_and_short_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team\ntml-carol-0003\n\n")
    config = Config(thinker_api_keys=ALICE, thinker_api_keys_file=str(keys))
    ring = KeyRing.from_config(config, Database(tmp_path / "a.db"))
    assert ring.enabled and ring.count() == 2
    assert ring.owner_of("tml-carol-0003") and ring.owner_of(ALICE) and ring.owner_of(BOB) is None
    assert ring.owner_of(ALICE) != ring.owner_of("tml-carol-0003")
    other = KeyRing.from_config(Config(thinker_api_keys=ALICE), Database(tmp_path / "b.db"))
    assert ring.owner_of(ALICE) == other.owner_of(ALICE)  # the same owner on any server, after any restart
    with pytest.raises(ConfigurationError, match="at least 8"):
        KeyRing.from_config(Config(thinker_api_keys="short"), Database(tmp_path / "c.db"))


@pytest.mark.unit
def test_keys_live_in_the_database_digested(tmp_path):
    db = Database(tmp_path / "thinker.db")
    ring = KeyRing.from_config(Config(thinker_api_keys=f"{ALICE},{BOB}"), db)
    stored = [row[0] for row in db.query("SELECT digest FROM api_keys")]
    assert len(stored) == 2 and ALICE not in stored and BOB not in stored  # digests only
    # Removing a key from the config revokes it at the next start; a keys.py key stays.
    cli = Database(tmp_path / "thinker.db")  # keys.py: another process, another connection
    made = keys_cli.create(cli, "carol")
    ring = KeyRing.from_config(Config(thinker_api_keys=ALICE), db)
    assert ring.owner_of(ALICE) and ring.owner_of(BOB) is None and ring.owner_of(made)
    assert keys_cli.revoke(cli, "carol") == 1 and ring.owner_of(made) is None  # at once, no restart


@pytest.mark.e2e
@pytest.mark.slow
def test_open_mode_says_so_at_start(server, keyed):
    assert "OPEN single-user mode" in server.log()
    assert "API keys: on (2 keys)" in keyed.log()


@pytest.mark.e2e
@pytest.mark.slow
def test_python_client_sends_its_key(keyed):
    from client_example import TinkerClient
    from thinker.core.errors import AuthenticationError

    with TinkerClient(keyed.url, api_key=BOB) as client:
        model_id = client.wait_for_result(client.add_lora(base_model="base", rank=4, alpha=8))["model_id"]
        assert client.sample(model_id=model_id, prompts=["hi"], max_tokens=2)["num_tokens"]
    with TinkerClient(keyed.url) as anonymous, pytest.raises(AuthenticationError):
        anonymous.add_lora(base_model="base", rank=4, alpha=8)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_key_made_with_keys_py_works_at_once(keyed):
    db = Database(Path(keyed.env["THINKER_DATA_DIR"]) / "thinker.db")  # the live server's database
    dave = keys_cli.create(db, "dave")
    assert call(keyed, "GET", "/adapters", dave).status_code == 200
    keys_cli.revoke(db, "dave")
    assert call(keyed, "GET", "/adapters", dave).status_code == 401
