"""Hostile ids and names never reach the filesystem: nothing is written outside
THINKER_DATA_DIR and nothing into another tenant's files.

Two tenants, alice and bob, share a keyed server whose data dir is nested two folders deep in
a sandbox. Alice trains a model and saves it; bob then walks every writing endpoint of both
APIs with hostile ids (absolute paths, ``../``, ``./sess-<alice's>``, alice's own ids, ids with
a newline, a NUL or a slash). Every one of bob's calls must be refused (a 4xx, or a future that
fails as the caller's error); afterwards nothing new exists in the sandbox outside the data
dir, alice's files are byte-identical, her checkpoint reloads to the same loss and her session
lists only what she made. Also: names ending in a newline are refused, and signed download
links answer 4xx to a non-ASCII signature and stop working once their checkpoint is saved again.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import requests

from thinker.core.errors import BadRequestError
from thinker.store.checkpoints import TinkerPath

ALICE, BOB = "tml-alice-paths-1", "tml-bob-paths-22"
CHAT = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, friend"}]]
TINY = "builtin-tiny"
HTTP = requests.Session()  # one kept-alive connection: the walk makes hundreds of calls


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def data_dir(sandbox) -> Path:
    return sandbox / "parent" / "data"


@pytest.fixture(scope="module")
def keyed(start_server, data_dir):
    return start_server(THINKER_API_KEYS=f"{ALICE},{BOB}", THINKER_DATA_DIR=str(data_dir))


def call(server, method: str, path: str, key: str | None, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return HTTP.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kwargs)


def post(server, key: str, path: str, body: dict) -> requests.Response:
    return call(server, "POST", path, key, json=body)


def settle(server, key: str, request_id: str) -> dict:
    """The future's end, through the Tinker long-poll (it serves both APIs' futures)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = post(server, key, "/api/v1/retrieve_future", {"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise AssertionError(f"future {request_id} did not finish")


def result(server, key: str, response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    answer = settle(server, key, response.json()["request_id"])
    assert "error" not in answer, answer
    return answer


def refused(server, key: str, response: requests.Response) -> str | None:
    """None if the call was refused as the caller's error, else what happened instead."""
    if 400 <= response.status_code < 500:
        return None
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    request_id = response.json().get("request_id")
    if request_id is None:
        return f"accepted: {response.text[:200]}"
    answer = settle(server, key, request_id)
    if answer.get("category") == "user":
        return None
    return f"future {answer}"


def files_under(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def outside(sandbox: Path, data_dir: Path) -> set[str]:
    """Everything in the sandbox but the data dir's contents."""
    return {str(p.relative_to(sandbox)) for p in sandbox.rglob("*") if not p.is_relative_to(data_dir)}


def reload_loss(server, key: str, path: str) -> float:
    loaded = result(server, key, post(server, key, "/load_state", {"path": path}))["model_id"]
    loss = result(server, key, post(server, key, "/fwdbwd", {"model_id": loaded, "data": CHAT}))["loss"]
    result(server, key, post(server, key, "/delete_lora", {"model_id": loaded}))
    return loss


def new_model(server, key: str) -> tuple[str, str]:
    """A Tinker session and a model in it, trained a little (so its weights are its own)."""
    session = post(server, key, "/api/v1/create_session", {}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 4}}
    model = result(server, key, post(server, key, "/api/v1/create_model", body))["model_id"]
    for _ in range(2):
        result(server, key, post(server, key, "/fwdbwd", {"model_id": model, "data": CHAT}))
        step = {"model_id": model, "adam_params": {"learning_rate": 0.05}}
        result(server, key, post(server, key, "/optim_step", step))
    return session, model


@pytest.fixture(scope="module")
def alice(keyed, data_dir) -> dict:
    session, model = new_model(keyed, ALICE)
    saved = result(keyed, ALICE, post(keyed, ALICE, "/api/v1/save_weights", {"model_id": model, "path": "final"}))
    result(keyed, ALICE, post(keyed, ALICE, "/save_lora", {"model_id": model}))
    return {"session": session, "model": model, "path": saved["path"]}


def _hostile_sessions(alice: dict, sandbox: Path) -> list[str]:
    sid = alice["session"]
    return [
        str(sandbox / "outside" / "pwned-abs"),  # absolute: Path("root") / "/x" is "/x"
        "../../pwned-up",
        "../../../pwned-up",
        f"./{sid}",  # normalises to alice's own folder
        sid,
        f"{sid}:train:0",  # model "<sid>:train:0:train:0": its samplers land in alice's namespace
        f"{sid}\n",
        "pwned\x00nul",
        "pwned/slash",
        "sess-000000000000",  # well-formed, but nobody's
    ]


def _walk_model_endpoints(server, model: str, session: str, own_path: str) -> list:
    """Every writing endpoint that takes a model id (or a session id) with ``model`` and ``session``."""
    b = lambda path, body: (path, body, post(server, BOB, path, body))  # noqa: E731
    return [
        b("/save_lora", {"model_id": model}),
        b("/save_state", {"model_id": model, "name": "final"}),
        b("/optim_step", {"model_id": model}),
        b("/api/v1/save_weights", {"model_id": model, "path": "final", "overwrite": True}),
        b("/api/v1/save_weights_for_sampler", {"model_id": model, "path": "final"}),
        b("/api/v1/save_weights_for_sampler", {"model_id": model, "sampling_session_seq_id": 0}),
        b("/api/v1/save_weights_external", {"model_id": model, "path": "final"}),
        b("/api/v1/load_weights", {"model_id": model, "path": own_path}),
        b("/api/v1/create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": TINY}),
        b("/api/v1/load_weights", {"path": own_path, "session_id": session, "model_seq_id": 1}),
        b("/api/v1/session_heartbeat", {"session_id": session}),
        b("/delete_lora", {"model_id": model}),
    ]


@pytest.mark.slow
@pytest.mark.e2e
def test_hostile_ids_write_nothing_outside_the_data_dir_nor_into_another_tenant(keyed, alice, sandbox, data_dir):
    alice_files = files_under(data_dir / "checkpoints") | files_under(data_dir / "adapters")
    assert any(alice["model"] in name for name in alice_files)
    loss_before = reload_loss(keyed, ALICE, alice["path"])
    outside_before = outside(sandbox, data_dir)
    alice_listing = call(keyed, "GET", "/api/v1/checkpoints", ALICE).json()

    # Bob's own model and checkpoint, legitimately named "final" too: his and alice's stay apart.
    bob_session, bob_model = new_model(keyed, BOB)
    own = {"model_id": bob_model, "path": "final"}
    bob_path = result(keyed, BOB, post(keyed, BOB, "/api/v1/save_weights", own))["path"]
    assert bob_path != alice["path"]

    calls = []
    for session in _hostile_sessions(alice, sandbox):
        body = {"session_id": session, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 4}}
        calls.append(("/api/v1/create_model", body, post(keyed, BOB, "/api/v1/create_model", body)))
        calls += _walk_model_endpoints(keyed, f"{session}:train:0", session, bob_path)
    for model in (alice["model"], f"./{alice['model']}", "../../pwned", str(sandbox / "pwned-model")):
        calls += _walk_model_endpoints(keyed, model, alice["session"], bob_path)
    # Bob's own model, hostile checkpoint names.
    for name in ("../../pwned", str(sandbox / "pwned-name"), "final\n", "a\x00b", "x/y", ".", ".."):
        for path in ("/api/v1/save_weights", "/api/v1/save_weights_for_sampler", "/api/v1/save_weights_external"):
            calls.append((path, name, post(keyed, BOB, path, {"model_id": bob_model, "path": name})))
        calls.append(("/save_state", name, post(keyed, BOB, "/save_state", {"model_id": bob_model, "name": name})))
    # Hostile tinker:// paths, and alice's own checkpoint.
    run = alice["model"]
    for path in (alice["path"], f"tinker://./{run}/weights/final", f"tinker://../../{run}/weights/final",
                 f"tinker://{run}/weights/final\n", f"tinker://{run}/weights/../final"):
        for endpoint, body in (
            ("/load_state", {"path": path}),
            ("/api/v1/load_weights", {"path": path, "session_id": bob_session, "model_seq_id": 5}),
            ("/api/v1/create_sampling_session", {"session_id": bob_session, "sampling_session_seq_id": 9,
                                                 "model_path": path}),
        ):
            calls.append((endpoint, body, post(keyed, BOB, endpoint, body)))
    for run_id in (run, "%2E%2E", "%2E", f"%2E%2F{run}"):
        base = f"/api/v1/training_runs/{run_id}/checkpoints/weights/final"
        for method, suffix, body in (("DELETE", "", None), ("POST", "/publish", None), ("PUT", "/ttl", {})):
            calls.append((f"{method} {base}{suffix}", body, call(keyed, method, base + suffix, BOB, json=body)))
    calls.append(("finish", run, post(keyed, BOB, f"/api/v1/sessions/{alice['session']}/finish", {})))

    accepted = [(path, body, why) for path, body, response in calls if (why := refused(keyed, BOB, response))]

    after = files_under(data_dir / "checkpoints") | files_under(data_dir / "adapters")
    assert {k: v for k, v in after.items() if k in alice_files} == alice_files
    assert reload_loss(keyed, ALICE, alice["path"]) == pytest.approx(loss_before, rel=1e-5, abs=1e-6)
    assert outside(sandbox, data_dir) == outside_before
    assert not accepted, "\n".join(map(repr, accepted))
    assert call(keyed, "GET", "/api/v1/checkpoints", ALICE).json() == alice_listing
    session = call(keyed, "GET", f"/api/v1/sessions/{alice['session']}", ALICE).json()
    assert session["training_run_ids"] == [alice["model"]] and session["sampler_ids"] == []


@pytest.fixture(scope="module")
def bob_model(keyed) -> str:
    return new_model(keyed, BOB)[1]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["final\n", "final\r", "fi\x00nal", "../x", "a/b", ".", "..", "", "x" * 201])
def test_bad_checkpoint_names_are_refused_by_the_seed_api(keyed, bob_model, name):
    response = post(keyed, BOB, "/save_state", {"model_id": bob_model, "name": name})
    assert response.status_code == 400, response.text
    assert post(keyed, BOB, "/load_state", {"path": f"tinker://{bob_model}/weights/{name}"}).status_code == 400


@pytest.mark.e2e
def test_a_name_ending_in_a_newline_fails_a_tinker_save(keyed, bob_model):
    model = bob_model
    response = post(keyed, BOB, "/api/v1/save_weights", {"model_id": model, "path": "final\n"})
    answer = settle(keyed, BOB, response.json()["request_id"])
    assert answer.get("category") == "user" and "name" in answer["error"], answer
    runs = call(keyed, "GET", f"/api/v1/training_runs/{model}/checkpoints", BOB).json()["checkpoints"]
    assert runs == []


@pytest.mark.unit
def test_tinker_path_and_path_builder_reject_anything_but_a_plain_name(tmp_path):
    from thinker.core.paths import path_under  # (the one place data-dir paths are built)

    for bad in ("final\n", "a/b", "..", ".", "a\x00b", "/abs", ""):
        with pytest.raises(BadRequestError):
            TinkerPath("run", "weights", bad)
        with pytest.raises(BadRequestError):
            TinkerPath(bad, "weights", "name")
        with pytest.raises(BadRequestError):
            path_under(tmp_path, "ok", bad)
    with pytest.raises(BadRequestError):
        TinkerPath("run", "not-a-kind", "name")
    assert path_under(tmp_path, "run:train:0", "weights", "final") == tmp_path.resolve() / "run:train:0/weights/final"
    escape = tmp_path / "link"
    escape.symlink_to(tmp_path.parent)  # a folder inside the root that points out of it
    with pytest.raises(BadRequestError):
        path_under(tmp_path, "link", "x")


def _urls(server, key: str, path: str) -> dict[str, str]:
    run, kind, name = path.removeprefix("tinker://").split("/")
    answer = call(server, "GET", f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/external_weights_urls", key)
    assert answer.status_code == 200, answer.text
    return answer.json()["urls"]


@pytest.mark.e2e
def test_a_signed_url_with_a_non_ascii_signature_is_a_4xx(keyed, bob_model):
    export = {"model_id": bob_model, "path": "export-ascii"}
    path = result(keyed, BOB, post(keyed, BOB, "/api/v1/save_weights_external", export))["path"]
    url = _urls(keyed, BOB, path)["adapter_config.json"]
    assert requests.get(url, timeout=60).status_code == 200
    base, _, _ = url.partition("signature=")
    for forged in ("é", "ü" * 64, "\u2603"):
        assert requests.get(base + "signature=" + forged, timeout=60).status_code in (400, 404)


@pytest.mark.e2e
def test_a_signed_url_dies_when_its_checkpoint_is_saved_again(keyed, bob_model):
    export = {"model_id": bob_model, "path": "export-again"}
    path = result(keyed, BOB, post(keyed, BOB, "/api/v1/save_weights_external", export))["path"]
    old = _urls(keyed, BOB, path)["adapter_model.safetensors"]
    assert requests.get(old, timeout=60).status_code == 200
    result(keyed, BOB, post(keyed, BOB, "/api/v1/save_weights_external", export))  # the same name, saved again
    assert requests.get(old, timeout=60).status_code in (404, 410)
    fresh = _urls(keyed, BOB, path)["adapter_model.safetensors"]
    assert requests.get(fresh, timeout=60).status_code == 200
