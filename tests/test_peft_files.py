"""Tinker's export names for the output head (backend/lora/peft_files.py): a file renamed with
``to_tinker_names`` keeps every other key, loads back into the server as the same adapter, and
loads in peft with ``TINKER_KEY_MAPPING``."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from backend import AdamParams, FwdBwdRequest
from backend.lora.layer import use_adapters
from backend.lora.peft_files import TINKER_HEAD, TINKER_KEY_MAPPING, to_tinker_names

pytestmark = pytest.mark.unit

CONV = [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]


def test_a_tinker_named_export_loads_back_and_in_peft(backend, tmp_path):
    adapter_id = backend.add_lora(4, 8.0, ["q_proj", "lm_head"], 5)["model_id"]
    examples = backend.render_conversations([CONV])
    for _ in range(3):  # B != 0 everywhere, the head's too
        backend.forward_backward([FwdBwdRequest(adapter_id, examples)])
        backend.optim_step(adapter_id, AdamParams(learning_rate=1e-2))
    folder = tmp_path / "export"
    backend.save_adapter(adapter_id, folder)
    before = set(load_file(str(folder / "adapter_model.safetensors")))
    to_tinker_names(folder, "lm_head")
    after = set(load_file(str(folder / "adapter_model.safetensors")))
    assert {k for k in before if "lm_head" not in k} == {k for k in after if TINKER_HEAD not in k}
    assert {k for k in after if TINKER_HEAD in k} == {f"base_model.model.{TINKER_HEAD}.lora_{m}.weight" for m in "AB"}

    tokens = examples[0].input_tokens[None]
    with torch.no_grad(), use_adapters([adapter_id]):
        ours = backend.model(input_ids=tokens).logits
    loaded = backend.create_from_checkpoint(folder, None, optimizer=False, trainable=False)["model_id"]
    with torch.no_grad(), use_adapters([loaded]):
        again = backend.model(input_ids=tokens).logits
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)

    base = AutoModelForCausalLM.from_pretrained(backend.loaded.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(folder), key_mapping=TINKER_KEY_MAPPING).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    for model_id in (adapter_id, loaded):
        backend.adapters.remove(model_id)
