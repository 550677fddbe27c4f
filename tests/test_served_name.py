"""SERVED_MODEL_NAME: the base model's public name, chosen once (thinker/http/services.py) and
reported by every endpoint that names the model; the weights and tokenizer still load from
BASE_MODEL."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import requests
import tinker

from thinker.core.config import Config
from thinker.http import tinker as _tinker_api  # noqa: F401 - imports services in the app's order
from thinker.http.services import public_served_name, served_model_name

HUB_ID = "Qwen/Qwen3-4B-Instruct-2507"


def _services(name: str, path: str, configured: str | None = None):
    loaded = SimpleNamespace(name=name, path=path)
    return SimpleNamespace(config=Config(served_model_name=configured), backend=SimpleNamespace(loaded=loaded))


def _folder(tmp_path, origin: str | None):
    folder = tmp_path / "weights"
    folder.mkdir()
    config = {"model_type": "llama"} | ({"_name_or_path": origin} if origin is not None else {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.unit
def test_the_hub_id_is_the_name():
    assert served_model_name(_services(HUB_ID, HUB_ID)) == HUB_ID
    assert served_model_name(_services(HUB_ID, HUB_ID, configured="acme/house-model")) == "acme/house-model"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (HUB_ID, HUB_ID),  # a folder copied from the hub: the hub id
        (None, "FOLDER"),  # nothing says where it came from: its absolute path
        ("/data/models/mine", "FOLDER"),  # a path is not a hub id
        ("../mine/x", "FOLDER"),
    ],
)
def test_a_local_folder_is_named_by_its_config(tmp_path, origin, expected):
    folder = _folder(tmp_path, origin)
    name = served_model_name(_services(str(folder), str(folder)))
    assert name == (str(folder.resolve()) if expected == "FOLDER" else expected)
    # /healthz is public: a folder's name, never its path
    assert "/" not in public_served_name(_services(str(folder), str(folder))) or name == HUB_ID
    assert served_model_name(_services(str(folder), str(folder), configured="me/x")) == "me/x"


@pytest.mark.unit
def test_builtin_tiny_keeps_its_name(cache_dir):
    from backend.model.builtin_tiny import ensure_builtin_tiny

    assert served_model_name(_services("builtin-tiny", str(ensure_builtin_tiny(cache_dir)))) == "builtin-tiny"


@pytest.mark.e2e
@pytest.mark.slow
def test_every_endpoint_reports_the_served_name(start_server, cache_dir, tmp_path):
    """A local copy of builtin-tiny whose config.json names a hub model: that name everywhere,
    while the server loads the folder (and still accepts its path)."""
    from backend.model.builtin_tiny import ensure_builtin_tiny

    folder = tmp_path / "local-model"
    shutil.copytree(ensure_builtin_tiny(cache_dir), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}))
    server = start_server(BASE_MODEL=str(folder))
    rest = tinker.RestClient(base_url=server.url, api_key="tml-test-key")
    assert [m.model_name for m in rest.get_server_capabilities().result().supported_models] == [HUB_ID]
    assert requests.get(f"{server.url}/healthz").json()["base_model"] == HUB_ID
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-test-key")
    try:
        training = service.create_lora_training_client(base_model=HUB_ID, rank=4).result()
        info = training.get_info()
        assert (info.model_name, info.model_data.model_name, info.model_data.tokenizer_id) == (HUB_ID,) * 3
        run = rest.get_training_run(info.model_id).result()
        assert run.base_model == HUB_ID
        path = training.save_state("s").result().path
        assert rest.get_weights_info_by_tinker_path(path).result().base_model == HUB_ID
        # The folder's own path is still accepted as base_model.
        service.create_lora_training_client(base_model=str(folder), rank=4).result()
        with pytest.raises(tinker.BadRequestError, match=f"this server serves '{HUB_ID}'"):
            service.create_lora_training_client(base_model="someone/else", rank=4).result()
    finally:
        service.close("success").result()
