"""The official tinker SDK's RestClient and checkpoint downloads against a live server:
runs and checkpoints are listed and deleted, and a downloaded adapter loads with peft and
reproduces the server's logprobs."""

from __future__ import annotations

import io
import tarfile

import pytest
import requests
import tinker
import torch
from safetensors import safe_open
from tinker import types

from backend.lora.peft_files import TINKER_KEY_MAPPING

pytestmark = pytest.mark.e2e


def test_rest_client_runs_checkpoints_and_peft_download(server, training, backend):
    rest = tinker.RestClient(base_url=server.url, api_key="tml-test-key")
    path = training.save_state("for-download").result().path
    run_id = path.removeprefix("tinker://").split("/")[0]
    run = rest.get_training_run(run_id).result()
    assert run.lora_rank == 8 and run.is_lora
    assert any(r.training_run_id == run_id for r in rest.list_training_runs().result().training_runs)
    listed = rest.list_checkpoints(run_id).result().checkpoints
    assert "weights/for-download" in [c.checkpoint_id for c in listed]
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.lora_rank == 8 and info.train_unembed and info.train_attn and info.train_mlp

    archive = requests.get(f"{server.url}/api/v1/training_runs/{run_id}/checkpoints/weights/for-download/archive")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = set(tar.getnames())
        assert names == {"adapter_config.json", "adapter_model.safetensors"}
        folder = backend.data_dir / "downloaded"
        tar.extractall(folder, filter="data")
    _check_peft_reproduces(training, folder, backend)

    rest.delete_checkpoint_from_tinker_path(path).result()
    assert "weights/for-download" not in [c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints]


def _check_peft_reproduces(training, folder, backend, key_mapping=None) -> None:
    """The downloaded adapter, loaded with peft onto a fresh copy of the base model, gives
    the logprobs the server gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode("Blue sky, green grass.", add_special_tokens=False)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )
    served = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
    base = AutoModelForCausalLM.from_pretrained(backend.loaded.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder), key_mapping=key_mapping).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    local = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(local, served, atol=1e-4, rtol=0)


def test_external_weights_download_with_signed_urls(server, training, backend):
    """The SDK's download flow: export, ask for signed URLs, fetch each file without a key."""
    rest = tinker.RestClient(base_url=server.url, api_key="tml-test-key")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([72, 105, 33]),
        loss_fn_inputs={"target_tokens": [105, 33, 2], "weights": [1.0] * 3},
    )
    for _ in range(3):  # moves every LoRA, the head's too, away from its zero start
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = training.save_weights_external("export-1").result().path
    assert path.endswith("/external_weights/export-1")
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {"adapter_config.json", "adapter_model.safetensors"}
    folder = backend.data_dir / "external"
    folder.mkdir(exist_ok=True)
    for name, url in urls.items():
        response = requests.get(url)
        assert response.status_code == 200
        (folder / name).write_bytes(response.content)
    # Tinker's export names: the head's LoRA under model.unembed_tokens (what the cookbook's merge
    # reads); peft places it with the key mapping peft_files gives.
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        heads = {key for key in f.keys() if "lm_head" in key or "unembed" in key}  # noqa: SIM118
    assert heads == {f"base_model.model.model.unembed_tokens.lora_{m}.weight" for m in "AB"}
    _check_peft_reproduces(training, folder, backend, key_mapping=TINKER_KEY_MAPPING)
    forged = urls["adapter_config.json"].replace("signature=", "signature=0")
    assert requests.get(forged).status_code == 404
