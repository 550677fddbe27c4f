"""tinker-cookbook itself (pinned, requirements-cookbook.txt) against a live server on builtin-tiny:
the flat SL and RL recipes, math_rl's arithmetic environment and DPO as shipped, with their
default losses (stable_reinforce for RL), and the weights flow (download of a training
checkpoint through an age-encrypted export, build_hf_model, build_lora_adapter) on a tied and
an untied model.

Small settings and local data only: the server serves builtin-tiny as ``SERVED`` (a ChatML
model, like builtin-tiny) so the recipes pick a renderer that fits it, the tokenizer under that
name is registered from the local folder, and ``datasets.load_dataset`` returns a few local rows.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import tinker
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from backend.model.builtin_tiny import build_tokenizer, ensure_builtin_tiny, write_model_once

try:
    import datasets
    from tinker_cookbook import tokenizer_utils, weights
    from tinker_cookbook.recipes import rl_loop, sl_loop
    from tinker_cookbook.recipes.math_rl import train as math_rl
    from tinker_cookbook.recipes.preference import datasets as preference_datasets
    from tinker_cookbook.recipes.preference.dpo import train as dpo
except ImportError as exc:  # this module is collected by every run (-m unit too): fail its tests, not the run
    MISSING: ImportError | None = exc
else:
    MISSING = None

pytestmark = pytest.mark.cookbook


@pytest.fixture(autouse=True)
def _cookbook_installed():
    if MISSING is not None:
        pytest.fail(f"{MISSING}: install requirements-cookbook.txt with --no-deps and requirements-dev.txt "
                    "(run_tests.sh does)")

SERVED = "Qwen/Qwen3-4B-Instruct-2507"  # renderer qwen3_instruct: ChatML, as builtin-tiny speaks
KEY = "tml-test-key"


def _local_dataset(splits: dict[str, list[dict]]):
    fake = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    return lambda *args, **kwargs: fake


class Spy:
    """Every forward_backward the recipes send, with its loss and result."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, list[types.Datum]]] = []
        original = tinker.TrainingClient.forward_backward

        def forward_backward(client, data, loss_fn, loss_fn_config=None, *args, **kwargs):
            self.calls.append((loss_fn, list(data)))
            return original(client, data, loss_fn, loss_fn_config, *args, **kwargs)

        monkeypatch.setattr(tinker.TrainingClient, "forward_backward", forward_backward)

    def losses(self) -> list[str]:
        return [loss for loss, _ in self.calls]


@pytest.fixture(scope="module")
def model_folder(cache_dir) -> Path:
    return ensure_builtin_tiny(cache_dir)


@pytest.fixture(scope="module")
def cookbook_env(monkeypatch_module, model_folder):
    monkeypatch_module.setenv("TINKER_API_KEY", KEY)
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    tokenizer_utils.register_tokenizer(SERVED, lambda: AutoTokenizer.from_pretrained(model_folder))


@pytest.fixture(scope="module")
def served(start_server, cookbook_env):
    """builtin-tiny, served under a hub name the cookbook knows."""
    return start_server(SERVED_MODEL_NAME=SERVED, MAX_WORKERS="2")


def _metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def _final_checkpoint(log_path: Path) -> dict:
    rows = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["name"] == "final")


def test_sl_loop(served, tmp_path, monkeypatch):
    conversations = [
        [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": f"{word}!"}]
        for word in ("hi", "yes", "blue", "four")
    ]
    rows = [{"messages": c} for c in conversations]
    monkeypatch.setattr(sl_loop.datasets, "load_dataset", _local_dataset({"train": rows}))
    spy = Spy(monkeypatch)
    log_path = tmp_path / "sl"
    config = sl_loop.Config(
        base_url=served.url, log_path=str(log_path), model_name=SERVED, batch_size=2, learning_rate=1e-2,
        max_length=256, lora_rank=4, save_every=0, max_steps=2,
    )
    sl_loop.main(config)
    assert spy.losses() == ["cross_entropy", "cross_entropy"]
    nll = [row["train_mean_nll"] for row in _metrics(log_path) if "train_mean_nll" in row]
    assert len(nll) == 2 and all(0 < x < 50 for x in nll)  # finite, per-token NLL of a random model
    final = _final_checkpoint(log_path)
    assert final["state_path"].startswith("tinker://") and final["sampler_path"].startswith("tinker://")


def test_rl_loop_with_its_default_loss(served, tmp_path, monkeypatch):
    questions = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                 for a, b in [(2, 3), (4, 1), (1, 1), (5, 2)]]
    monkeypatch.setattr(rl_loop.datasets, "load_dataset", _local_dataset({"train": questions}))
    # A tiny random model never writes \boxed{}: alternate the rewards so every group has an
    # advantage to train on (the recipe skips groups whose rewards are all equal).
    calls = iter(range(10_000))
    monkeypatch.setattr(rl_loop, "get_reward", lambda response, answer: float(next(calls) % 2))
    spy = Spy(monkeypatch)
    log_path = tmp_path / "rl"
    config = rl_loop.Config(
        base_url=served.url, log_path=str(log_path), model_name=SERVED, batch_size=2, group_size=4,
        learning_rate=1e-3, lora_rank=4, save_every=0, max_tokens=8, max_steps=2,
    )
    assert config.loss_fn == "stable_reinforce"  # the recipe's default, run as shipped
    rl_loop.main(config)
    assert spy.losses() == ["stable_reinforce", "stable_reinforce"]
    for _, data in spy.calls:
        assert len(data) == 8 and all(d.loss_fn_input_spans for d in data)
    steps = [row for row in _metrics(log_path) if "reward/total" in row]
    assert len(steps) == 2 and all("optim/lr" in row for row in steps)
    assert _final_checkpoint(log_path)["state_path"].startswith("tinker://")


def test_math_rl_arithmetic_with_its_default_loss(served, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    log_path = tmp_path / "math_rl"
    cli = math_rl.CLIConfig(
        base_url=served.url, log_path=str(log_path), model_name=SERVED, env="arithmetic", lora_rank=4,
        group_size=2, groups_per_batch=2, max_tokens=5, learning_rate=1e-3, max_steps=2, eval_every=0,
        save_every=0, behavior_if_log_dir_exists="delete",
    )
    assert cli.loss_fn == "stable_reinforce"
    asyncio.run(math_rl.cli_main(cli))
    assert spy.losses() and set(spy.losses()) == {"stable_reinforce"}
    assert all(d.loss_fn_input_spans for _, data in spy.calls for d in data)
    assert len([row for row in _metrics(log_path) if "optim/lr" in row or "env/all/reward/total" in row]) >= 2


def test_dpo(served, tmp_path, monkeypatch):
    pairs = [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
        for q, good, bad in [("Sky colour?", "Blue.", "Green."), ("2+2?", "Four.", "Five."),
                             ("Say hi.", "Hi!", "No."), ("Grass colour?", "Green.", "Red.")]
    ]
    monkeypatch.setattr(
        preference_datasets.datasets, "load_dataset", _local_dataset({"train": pairs, "test": pairs[:2]})
    )
    log_path = tmp_path / "dpo"
    cli = dpo.CLIConfig(
        base_url=served.url, log_path=str(log_path), model_name=SERVED, dataset="hhh", batch_size=2,
        max_length=256, learning_rate=1e-3, max_steps=2, behavior_if_log_dir_exists="delete",
    )
    dpo.cli_main(cli)
    rows = [row for row in _metrics(log_path) if "dpo_loss" in row]
    assert len(rows) == 2
    assert rows[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # step 0: the policy is the reference
    assert rows[1]["margin"] != 0.0  # step 1: the first update moved it


# --- weights: download (through an encrypted export), merge, PEFT adapter -------------------


def _untied_folder(root: Path) -> Path:
    """builtin-tiny's shape with an output head of its own (tie_word_embeddings=False)."""

    def build():
        tokenizer = build_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config), tokenizer

    return write_model_once(root / "untied-tiny", build)


def _train_and_download(server, out: Path) -> tuple[str, list[int], torch.Tensor]:
    """Train a LoRA on every layer and the head, save_state, then the cookbook's download of
    that tinker://.../weights/... path. Returns the base model name, a token sequence and the
    server's logprobs of it."""
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    try:
        training = service.create_lora_training_client(base_model=server.env["BASE_MODEL"], rank=4, seed=3)
        ids = [1, 72, 105, 33, 2, 1, 66, 121, 101, 2]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
        )
        for _ in range(3):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        served_logprobs = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_torch()
        path = training.save_state("for-cookbook").result().path
    finally:
        service.close("success").result()
    assert "/weights/" in path
    weights.download(tinker_path=path, output_dir=str(out), base_url=server.url)
    return path, ids, served_logprobs


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_weights_download_build_hf_model_and_build_lora_adapter(start_server, cookbook_env, model_folder, tmp_path,
                                                                  cache_dir, tied):
    folder = model_folder if tied else _untied_folder(Path(cache_dir))
    server = start_server(BASE_MODEL=str(folder), MAX_WORKERS="2")
    adapter = tmp_path / "adapter"
    _, ids, served_logprobs = _train_and_download(server, adapter)
    # The download decrypted the export: plain PEFT files, the head under Tinker's name.
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.model.unembed_tokens.lora_A.weight" in keys

    merged = tmp_path / "merged"
    weights.build_hf_model(base_model=str(folder), adapter_path=str(adapter), output_path=str(merged))
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not torch.allclose(_logprobs(merged_model, ids), _logprobs(base_model, ids), atol=1e-3)
    if not tied:  # untied: the merge is exact (tied, the cookbook folds the head's delta into the embedding)
        torch.testing.assert_close(_logprobs(merged_model, ids), served_logprobs, atol=1e-4, rtol=0)

    peft_dir = tmp_path / "peft"
    weights.build_lora_adapter(base_model=str(folder), adapter_path=str(adapter), output_path=str(peft_dir))
    peft_keys = set(load_file(str(peft_dir / "adapter_model.safetensors")))
    head = "model.embed_tokens" if tied else "lm_head"
    assert any(key.startswith(f"base_model.model.{head}.") for key in peft_keys), sorted(peft_keys)
    if not tied:
        peft_model = PeftModel.from_pretrained(base_model, str(peft_dir)).eval()
        torch.testing.assert_close(_logprobs(peft_model, ids), served_logprobs, atol=1e-4, rtol=0)
    shutil.rmtree(tmp_path, ignore_errors=True)
