"""PEFT format: a saved adapter loads with peft onto the base model and gives our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend import AdamParams, FwdBwdRequest
from backend.lora.layer import use_adapters

CONV = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi Alice!"}]


@pytest.mark.unit
def test_saved_adapter_reproduces_server_logits_in_peft(backend):
    adapter_id = backend.add_lora(4, 12.0, ["q_proj", "v_proj", "down_proj"], 3)["model_id"]
    examples = backend.render_conversations([CONV])
    for _ in range(3):  # train so that B != 0 and the adapter really changes the output
        backend.forward_backward([FwdBwdRequest(adapter_id, examples)])
        backend.optim_step(adapter_id, AdamParams(learning_rate=1e-2))
    saved = backend.save_adapter(adapter_id)

    config = json.loads((Path(saved["path"]) / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0
    # exact module paths (a short name would let peft pick other modules of that name)
    assert set(config["target_modules"]) == set(backend.adapters.get(adapter_id).layer_names)
    assert {path.rsplit(".", 1)[-1] for path in config["target_modules"]} == {"q_proj", "v_proj", "down_proj"}

    tokens = examples[0].input_tokens[None]
    with torch.no_grad(), use_adapters([adapter_id]):
        ours = backend.model(input_ids=tokens).logits
    with torch.no_grad():
        base_logits = backend.model(input_ids=tokens).logits
    base = AutoModelForCausalLM.from_pretrained(backend.loaded.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, saved["path"]).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
    assert not torch.allclose(ours, base_logits, atol=1e-4), "training should have moved the adapter"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_adapter_saved_by_the_server_gives_the_servers_loss_in_peft(server, client, cache_dir):
    from transformers import AutoTokenizer

    from backend.model.builtin_tiny import ensure_builtin_tiny
    from backend.train.examples import render_conversation

    model_id = client.create_lora(rank=8, alpha=16, seed=4)
    for _ in range(3):
        client.train_step(model_id, [CONV], learning_rate=1e-2)
    path = client.wait_for_result(client.save_lora(model_id))["path"]
    server_loss = client.wait_for_result(client.fwdbwd(model_id, [CONV]))["loss"]

    model_path = str(ensure_builtin_tiny(str(cache_dir)))  # the server's folder (/healthz shows no paths)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    example = render_conversation(tokenizer, CONV)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), path).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=example.input_tokens[None]).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(2, example.target_tokens[None, :, None])[..., 0]
    weights = example.weights[None]
    peft_loss = float(-(logprobs * weights).sum() / weights.sum())
    assert peft_loss == pytest.approx(server_loss, abs=1e-5)
