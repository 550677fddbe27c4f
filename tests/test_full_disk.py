"""A full data disk and the per-key storage quota.

The disk is real: a small tmpfs mounted over a tmp folder (root only; skipped otherwise),
used as THINKER_DATA_DIR, filled through the API by one tenant's saves and then to the
last byte by a filler file. Other tenants' work goes on, deletes free space, a failed save
leaves nothing behind, and a restart on the full disk comes up and refuses saves with 507.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import requests
import tinker

from thinker.core.errors import InsufficientStorageError, StorageQuotaError
from thinker.store.checkpoints import CheckpointInfo, CheckpointStore, TinkerPath
from thinker.store.database import Database
from thinker.store.diskspace import RESERVE_NAME, DiskReserve, human, is_disk_full

ALICE, BOB = "tml-alice-disk-1", "tml-bob-disk-22"
CHAT = [[{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]]
MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs mounted over a tmp folder (unmounted afterwards)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    yield folder
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=False)  # a server still holds it (a failed test)


def fill(folder: Path, name: str) -> int:
    """Write a file into ``folder`` until the disk has no byte left; its size."""
    written = 0
    with open(folder / name, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return written


def post(server, path: str, key: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, headers={"X-API-Key": key}, timeout=60)


def run(server, path: str, key: str, body: dict) -> requests.Response:
    """Submit a job and wait for it: the retrieve_future answer (or the refused submission)."""
    submitted = post(server, path, key, body)
    if submitted.status_code != 200:
        return submitted
    return post(server, "/retrieve_future", key, {"request_id": submitted.json()["request_id"], "timeout": 60})


def trained_adapter(server, key: str, rank: int) -> str:
    model_id = run(server, "/add_lora", key, {"rank": rank, "alpha": 16.0, "seed": 1}).json()["result"]["model_id"]
    assert run(server, "/fwdbwd", key, {"model_id": model_id, "data": CHAT}).status_code == 200
    assert run(server, "/optim_step", key, {"model_id": model_id}).status_code == 200  # Adam state: a bigger save
    return model_id


def listed(server, key: str) -> list[str]:
    answer = requests.get(f"{server.url}/checkpoints", headers={"X-API-Key": key}, timeout=30)
    return [c["tinker_path"] for c in answer.json()["checkpoints"]]


def delete_checkpoint(server, key: str, path: str) -> requests.Response:
    run_id, kind, name = TinkerPath.parse(path).run_id, TinkerPath.parse(path).kind, TinkerPath.parse(path).name
    url = f"{server.url}/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}"
    return requests.delete(url, headers={"X-API-Key": key}, timeout=30)


def folders_on_disk(data: Path) -> set[str]:
    """Every checkpoint folder under the data dir, as tinker:// paths, plus staged leftovers."""
    root = data / "checkpoints"
    found = {f"tinker://{p.relative_to(root)}" for p in root.glob("*/*/*") if p.is_dir()}
    staged = {f"staging:{p.name}" for p in (data / "staging").glob("*")} if (data / "staging").exists() else set()
    return found | staged


# ---- the classifier and the store, in process ------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite3.OperationalError("database or disk is full"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        RuntimeError("[enforce fail at inline_container.cc:424] . PytorchStreamWriter failed writing file data/0: file "
                     "write failed"),
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ],
)
def test_full_disk_errors_are_recognised(exc):
    assert is_disk_full(exc)
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("writing the checkpoint failed") from inner
    except RuntimeError as chained:
        assert is_disk_full(chained)


@pytest.mark.unit
@pytest.mark.parametrize("exc", [OSError(errno.EACCES, "Permission denied"), ValueError("bad value"), RuntimeError()])
def test_other_errors_are_not_a_full_disk(exc):
    assert not is_disk_full(exc)


@pytest.mark.unit
def test_a_save_that_fills_the_disk_leaves_nothing_and_keeps_what_it_replaces(small_disk):
    reserve = DiskReserve(small_disk, MIB)
    assert reserve.ensure()
    store = CheckpointStore(small_disk, Database(small_disk / "thinker.db", on_full=reserve.release), reserve)
    path = TinkerPath("run", "weights", "ckpt")
    info = lambda: CheckpointInfo(str(path), "run", "weights", "ckpt", "tiny", 4, 8.0, [], 1, owner="me")  # noqa: E731

    def small(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)

    def endless(folder: Path) -> None:  # a real short write: the disk runs out under it
        folder.mkdir(parents=True)
        fill(folder, "adapter_model.safetensors")
        raise OSError(errno.ENOSPC, "No space left on device")

    store.save(info(), small, needed=1000)
    with pytest.raises(InsufficientStorageError, match="data disk is full"):
        store.save(info(), endless, needed=1000)  # an overwrite that fails
    assert list((small_disk / "staging").iterdir()) == []  # the partial write is gone
    assert (store.folder(path) / "adapter_model.safetensors").read_bytes() == b"x" * 1000  # the old one stays
    assert [c.tinker_path for c in store.list()] == [str(path)]
    assert reserve.ensure()  # the space came back


@pytest.mark.unit
def test_the_database_gives_up_the_reserve_when_the_disk_fills(small_disk):
    reserve = DiskReserve(small_disk, MIB)
    assert reserve.ensure() and not reserve.full
    db = Database(small_disk / "thinker.db", on_full=reserve.release)
    for i in range(50):
        db.execute("INSERT INTO api_keys VALUES (?, 'me', NULL, 'cli', 0)", (f"key-{i}",))
    fill(small_disk, "filler")
    assert reserve.full
    assert db.execute("DELETE FROM api_keys WHERE digest < 'key-3'") > 0  # the reserve made room
    assert not (small_disk / RESERVE_NAME).exists()
    fill(small_disk, "filler-2")  # and now nothing is left to give up
    with pytest.raises(InsufficientStorageError, match="data disk is full"):
        db.execute("INSERT INTO api_keys VALUES (?, 'me', NULL, 'cli', 0)", ("x" * 100_000,))
    assert db.record("INSERT INTO api_keys VALUES (?, 'me', NULL, 'cli', 0)", ("y" * 100_000,), "a key") == 0


@pytest.mark.unit
def test_checkpoint_sizes_of_an_older_database_count_towards_the_quota(tmp_path):
    old = sqlite3.connect(tmp_path / "thinker.db")
    old.execute(
        "CREATE TABLE checkpoints (tinker_path TEXT PRIMARY KEY, run_id TEXT NOT NULL, owner TEXT, "
        "created_at REAL NOT NULL, expires_at REAL, info TEXT NOT NULL)"
    )
    old.execute("INSERT INTO checkpoints VALUES ('tinker://r/weights/a', 'r', 'me', 0, NULL, '{\"size_bytes\": 1234}')")
    old.commit()
    old.close()
    store = CheckpointStore(tmp_path, Database(tmp_path / "thinker.db"), quota_bytes=2000)
    assert store.used_bytes("me") == 1234
    with pytest.raises(StorageQuotaError, match="MAX_STORAGE_BYTES_PER_USER"):
        store.check_room("me", 1000, TinkerPath("r", "weights", "b"))
    store.check_room("me", 1000, TinkerPath("r", "weights", "a"))  # replacing a: its bytes are freed


# ---- a live server ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_a_full_disk_refuses_saves_with_507_and_nothing_else(start_server, small_disk, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    data = small_disk / "data"
    server = start_server(
        THINKER_DATA_DIR=str(data), THINKER_API_KEYS=f"{ALICE},{BOB}", DISK_RESERVE_BYTES=str(4 * MIB)
    )
    assert (data / RESERVE_NAME).stat().st_size == 4 * MIB
    bob_model = trained_adapter(server, BOB, rank=4)
    bob_saved = run(server, "/save_state", BOB, {"model_id": bob_model, "name": "early"}).json()["result"]["path"]

    # Alice fills the disk with checkpoints until a save is refused, before it writes anything.
    alice_model = trained_adapter(server, ALICE, rank=256)
    refused = None
    for i in range(12):
        answer = run(server, "/save_state", ALICE, {"model_id": alice_model, "name": f"fill-{i}"})
        if answer.status_code != 200:
            refused = answer
            break
    assert refused is not None and refused.status_code == 507, refused and refused.text
    assert "data disk is full" in refused.json()["error"] and "delete" in refused.json()["error"]
    alice_saved = listed(server, ALICE)
    assert len(alice_saved) >= 2
    # Then to the last byte, so that even the database has no room.
    fill(small_disk, "filler")
    assert folders_on_disk(data) == set(alice_saved) | {bob_saved}  # no unlisted or staged leftovers

    # The Tinker API's saves (checked in the job, in the model's turn) say so too.
    with sdk(server, ALICE) as service:
        training = service.create_lora_training_client(base_model="builtin-tiny", rank=8).result()
        with pytest.raises(tinker.RequestFailedError, match="data disk is full"):
            training.save_state("tinker-fill").result()
    assert folders_on_disk(data) == set(alice_saved) | {bob_saved}

    # Everyone else's work that needs no new disk space goes on.
    new_bob = run(server, "/add_lora", BOB, {"rank": 4, "alpha": 8.0, "seed": 2})
    assert new_bob.status_code == 200, new_bob.text
    for path, body in [
        ("/fwdbwd", {"model_id": bob_model, "data": CHAT}),
        ("/optim_step", {"model_id": bob_model}),
        ("/load_state", {"path": bob_saved}),
    ]:
        answer = run(server, path, BOB, body)
        assert answer.status_code == 200 and answer.json()["status"] == "completed", (path, answer.text)
    params = {"max_tokens": 4, "temperature": 0}
    sample = post(server, "/api/v1/sample", BOB, {"model_id": bob_model, "prompts": ["Hi"], "sampling_params": params})
    assert sample.status_code == 200, sample.text
    assert run(server, "/save_state", BOB, {"model_id": bob_model, "name": "late"}).status_code == 507

    # Deletes work on the full disk, and free space.
    free_before = os.statvfs(small_disk).f_bavail
    for path in alice_saved[:2]:
        assert delete_checkpoint(server, ALICE, path).status_code == 200
    assert run(server, "/delete_lora", ALICE, {"model_id": alice_model}).status_code == 200
    assert os.statvfs(small_disk).f_bavail > free_before
    assert set(listed(server, ALICE)) == set(alice_saved[2:])
    late = run(server, "/save_state", BOB, {"model_id": bob_model, "name": "late"})  # room again
    assert late.status_code == 200 and late.json()["status"] == "completed", late.text

    # kill -9 with work in flight, fill the disk to the last byte, restart: it comes up and says why.
    in_flight = post(server, "/fwdbwd", BOB, {"model_id": bob_model, "data": CHAT * 8})
    assert in_flight.status_code == 200
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    fill(small_disk, "filler-2")
    server = start_server(**server.env)  # wait_ready: healthz answers 200
    assert "the data disk is full" in server.log()
    health = requests.get(f"{server.url}/healthz", timeout=30).json()
    assert health["disk_full"] is True
    assert set(listed(server, ALICE)) == set(alice_saved[2:])
    bob_model = run(server, "/load_state", BOB, {"path": bob_saved}).json()["result"]["model_id"]
    refused = post(server, "/save_state", BOB, {"model_id": bob_model, "name": "after-restart"})
    assert refused.status_code == 507 and "data disk is full" in refused.json()["error"]
    assert delete_checkpoint(server, BOB, bob_saved).status_code == 200
    server.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_the_storage_quota_refuses_with_403_before_the_disk_fills(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    quota = 4 * MIB
    server = start_server(
        THINKER_DATA_DIR=str(tmp_path / "data"), THINKER_API_KEYS=f"{ALICE},{BOB}",
        MAX_STORAGE_BYTES_PER_USER=str(quota),
    )
    model = trained_adapter(server, ALICE, rank=64)
    refused = None
    for i in range(12):
        answer = run(server, "/save_state", ALICE, {"model_id": model, "name": f"q-{i}"})
        if answer.status_code != 200:
            refused = answer
            break
    assert refused is not None and refused.status_code == 403, refused and refused.text
    message = refused.json()["error"]
    assert refused.json()["type"] == "StorageQuotaError"
    assert "MAX_STORAGE_BYTES_PER_USER" in message and "4.0 MiB" in message and "delete" in message
    saved = requests.get(f"{server.url}/checkpoints", headers={"X-API-Key": ALICE}, timeout=30).json()["checkpoints"]
    used = sum(c["size_bytes"] for c in saved)
    assert len(saved) >= 1 and used <= quota
    assert f"use {human(used)}" in message
    # The seed API's PEFT export meets the same quota, refused before anything is written.
    exports = tmp_path / "data" / "adapters"
    before = sorted(exports.rglob("*")) if exports.exists() else []
    refused = post(server, "/save_lora", ALICE, {"model_id": model})
    assert refused.status_code == 403 and "MAX_STORAGE_BYTES_PER_USER" in refused.json()["error"], refused.text
    assert (sorted(exports.rglob("*")) if exports.exists() else []) == before
    # The quota is per key: Bob saves; the Tinker API's saves meet the same quota.
    bob_model = trained_adapter(server, BOB, rank=64)
    assert run(server, "/save_state", BOB, {"model_id": bob_model, "name": "mine"}).json()["status"] == "completed"
    # An adapter keeps its newest export only, so exports cannot pile up; deleting the adapter
    # removes it and frees its bytes.
    for _ in range(3):
        assert run(server, "/save_lora", BOB, {"model_id": bob_model}).json()["status"] == "completed"
        assert run(server, "/fwdbwd", BOB, {"model_id": bob_model, "data": CHAT}).status_code == 200
        assert run(server, "/optim_step", BOB, {"model_id": bob_model}).status_code == 200  # a new step: a new folder
    assert [p.name for p in (exports / bob_model).iterdir()] == ["step_000003"]
    assert run(server, "/delete_lora", BOB, {"model_id": bob_model}).json()["status"] == "completed"
    assert not (exports / bob_model).exists()
    with sdk(server, ALICE) as service:
        training = service.create_lora_training_client(base_model="builtin-tiny", rank=64).result()
        with pytest.raises(tinker.RequestFailedError, match="MAX_STORAGE_BYTES_PER_USER"):
            for i in range(12):
                training.save_state(f"sdk-{i}").result()
        # Deleting a checkpoint makes room again.
        assert delete_checkpoint(server, ALICE, saved[0]["tinker_path"]).status_code == 200
        training.save_state("after-delete").result()
    server.stop()


@contextlib.contextmanager
def sdk(server, key: str):
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        yield service
    finally:
        service.close("success").result()
