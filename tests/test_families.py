"""Every architecture family, end to end on a tiny random model (hidden 64, 2 layers).

Each family's model is written to a folder and loaded through the real path
(``load_base_model`` with BASE_MODEL=<folder>), once per session. For each: an adapter on
the default targets and one on every layer LoRA may target (the head too, where it can)
train 5 fused steps (each loss falls), sample beside the base model in one decode batch
(rows of different lengths, so padding is exercised; base rows come out as they do
alone, and every sampled token's logprob is what a full forward gives), export, and the
export loaded with peft gives the server's logprobs within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend import AdamParams, FwdBwdRequest, HFBackend, SamplingParams, load_base_model
from backend.lora.layer import use_adapters
from backend.model.tiny_families import FAMILIES, ensure_family_model
from backend.sample.decode import DecodeBatch, generate
from backend.sample.sampling import SampleRow
from thinker.core.config import Config

pytestmark = pytest.mark.unit

CONV = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
PROMPTS = ["Hi", "What is two plus two?", "Say something longer than the others, please."]
# Families whose experts are fused 3-D parameters (transformers 5): per-expert LoRA on them.
MOE = {"qwen2-moe", "qwen3-moe", "mixtral", "gpt-oss", "deepseek-v3"}
EXPERT_WEIGHTS = {"gate_up_proj", "down_proj"}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def family_config(family: str, root, **fields) -> Config:
    folder = ensure_family_model(family, root / "models")  # written once per session
    return Config(base_model=str(folder), thinker_cache_dir=str(root / "cache"), device="cpu", **fields)


@pytest.fixture(scope="session")
def family_backends(family_root):
    """One backend per family, loaded on first use and kept for the session."""
    backends: dict[str, HFBackend] = {}

    def get(family: str) -> HFBackend:
        if family not in backends:
            backends[family] = HFBackend(load_base_model(family_config(family, family_root)), family_root / family)
        return backends[family]

    yield get
    for backend in backends.values():
        backend.close()


def _train(backend: HFBackend, adapter_ids: list[str], steps: int = 5) -> dict[str, list[float]]:
    examples = backend.render_conversations([CONV])
    losses: dict[str, list[float]] = {a: [] for a in adapter_ids}
    for _ in range(steps):
        results = backend.forward_backward([FwdBwdRequest(a, examples) for a in adapter_ids])  # one fused pass
        for adapter_id, result in zip(adapter_ids, results, strict=True):
            assert not isinstance(result, BaseException), result
            losses[adapter_id].append(result["loss"])
            backend.optim_step(adapter_id, AdamParams(learning_rate=5e-3))
    return losses


def _full_forward_logprobs(backend: HFBackend, adapter_id: str | None, tokens: list[int]) -> torch.Tensor:
    values, _ = backend.prompt_logprobs(adapter_id, tokens, 0)
    return torch.tensor(values[1:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_lora_life_cycle(family, family_backends):
    backend = family_backends(family)
    loaded = backend.loaded
    assert bool(loaded.fused_experts) == (family in MOE)
    default = backend.add_lora(4, 8.0, None, 1)["model_id"]
    everything = backend.add_lora(4, 8.0, backend.allowed_targets(), 2)["model_id"]

    losses = _train(backend, [default, everything])
    for adapter_id, curve in losses.items():
        assert curve[-1] < curve[0], f"{family} {adapter_id}: loss did not fall: {curve}"
    expert_weights = set(loaded.fused_experts)
    for adapter_id in (default, everything):
        adapter = backend.adapters.get(adapter_id)
        assert expert_weights <= set(adapter.layer_names), f"{family}: experts not targeted by {adapter_id}"
        for name in expert_weights:  # the experts' LoRA trained (B moved off zero) on every expert hit
            assert loaded.lora_layers[name].lora_B[adapter_id].abs().sum() > 0, f"{family} {name}"

    # Sampling: base and both adapters in one batch, prompts of different lengths.
    prompts = backend.render_prompts(PROMPTS)
    owners = [None, default, everything, None, everything]
    # Rows finish at different steps, so rows leave a running batch (and its padding is trimmed).
    rows = [
        SampleRow(a, prompts[i % len(prompts)], SamplingParams(6 - i, temperature=1.0, seed=5, stop_at_eos=False))
        for i, a in enumerate(owners)
    ]
    mixed = generate(backend.model, backend.tokenizer, rows, backend.eos_ids, loaded.context_length, backend.device)
    alone = generate(backend.model, backend.tokenizer, rows[:1], backend.eos_ids, loaded.context_length, backend.device)
    assert mixed[0].tokens == alone[0].tokens, f"{family}: base sampling changed beside trained adapters"
    for row, completion in zip(rows, mixed, strict=True):
        n = row.params.max_tokens
        assert len(completion.tokens) == n
        full = _full_forward_logprobs(backend, row.adapter_id, row.prompt_tokens + completion.tokens)
        got = torch.tensor(completion.logprobs)
        torch.testing.assert_close(got, full[-n:], rtol=0, atol=1e-4, msg=f"{family} {row.adapter_id}: decode")

    # Export, and peft reproduces the server's logprobs.
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    tokens = backend.render_conversations([CONV])[0].input_tokens[None]
    for adapter_id in (default, everything):
        saved = backend.save_adapter(adapter_id)
        with torch.no_grad(), use_adapters([adapter_id]):
            ours = torch.log_softmax(backend.model(input_ids=tokens).logits.float(), dim=-1)
        with torch.no_grad():
            base = torch.log_softmax(backend.model(input_ids=tokens).logits.float(), dim=-1)
        assert not torch.allclose(ours, base, atol=1e-3), f"{family}: training did not move {adapter_id}"
        fresh = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(fresh, saved["path"]).eval()
        wrapped = {  # the 3-D weights peft put LoRA on (nested wrappers: one .base_layer per level)
            f"{path.replace('.base_layer', '')}.{module.parameter_name}"
            for path, module in peft_model.base_model.model.named_modules()
            if isinstance(module, ParamWrapper)
        }
        assert expert_weights <= wrapped, f"{family}: peft put no LoRA on {expert_weights - wrapped}"
        with torch.no_grad():
            theirs = torch.log_softmax(peft_model(input_ids=tokens).logits.float(), dim=-1)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4, msg=f"{family} {adapter_id}: peft export")
        backend.remove_adapter(adapter_id)


def test_hybrid_decode_step_failing_for_one_row_leaves_the_others_exact(family_backends):
    """Qwen3.5's first layer is recurrent (updated in place), its last attention: a step
    that fails in the last layer has already changed the recurrent states, which must be
    put back before the batch is retried in parts, or the other rows' tokens change."""
    backend = family_backends("qwen3.5")
    context = backend.loaded.context_length
    greedy = SamplingParams(max_tokens=6, temperature=0, stop_at_eos=False)
    rows = [SampleRow(None, p, greedy) for p in backend.render_prompts(PROMPTS)]  # the last is the longest
    expected = generate(backend.model, backend.tokenizer, rows[:-1], backend.eos_ids, context, backend.device)

    inner, last = backend.model.model, backend.model.model.layers[-1]
    doomed = {"now": False, "failed": 0}
    others_reach = max(len(row.prompt_tokens) for row in rows[:-1]) + greedy.max_tokens
    assert len(rows[-1].prompt_tokens) > others_reach

    def forward(*args, **kwargs):
        ids_BL, mask_BL = kwargs["input_ids"], kwargs["attention_mask"]
        # Decode steps holding the longest prompt's row (more context than any other row can reach) fail.
        doomed["now"] = ids_BL.shape[1] == 1 and int(mask_BL.sum(-1).max()) > others_reach
        return type(inner).forward(inner, *args, **kwargs)

    def last_layer(*args, **kwargs):
        if doomed["now"]:
            doomed["failed"] += 1
            raise RuntimeError("injected failure")
        return type(last).forward(last, *args, **kwargs)

    failed = []
    batch = DecodeBatch(backend.model, backend.tokenizer, backend.eos_ids, backend.device)
    live = [batch.make_row(r, context, on_fail=lambda row, exc: failed.append(row)) for r in rows]
    inner.forward, last.forward = forward, last_layer
    try:
        batch.admit(live)
        while len(batch):
            batch.step()
    finally:
        del inner.forward, last.forward
    assert doomed["failed"] >= 2  # the whole batch, then the culprit's part
    assert failed == [live[-1]]
    assert [row.completion.tokens for row in live[:-1]] == [c.tokens for c in expected]
    for row, undisturbed in zip(live[:-1], expected, strict=True):
        torch.testing.assert_close(torch.tensor(row.completion.logprobs), torch.tensor(undisturbed.logprobs))


@pytest.mark.parametrize(
    ("family", "mlp_targets"),
    [
        ("qwen2-moe", {"gate_proj", "up_proj", "down_proj", "shared_expert_gate"}),  # + the shared expert
        ("qwen3-moe", set()),
        ("mixtral", set()),
        ("gpt-oss", set()),
        ("deepseek-v3", {"gate_proj", "up_proj", "down_proj"}),  # layer 0's dense MLP, the shared experts
    ],
)
def test_moe_models_target_their_experts(family, mlp_targets, family_backends):
    backend = family_backends(family)
    loaded = backend.loaded
    assert set(loaded.target_modules) - ATTENTION[family] == mlp_targets | EXPERT_WEIGHTS
    assert not loaded.unsupported
    assert {name.rsplit(".", 1)[-1] for name in loaded.fused_experts} == EXPERT_WEIGHTS


ATTENTION = {
    "qwen2-moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen3-moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gpt-oss": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "deepseek-v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
}


def test_deepseek_dense_mlp_exports_as_target_parameters_and_peft_applies_it(family_backends):
    """peft moves any target_modules entry ending in gate_proj/up_proj/down_proj onto the fused
    experts of DeepSeek-V3 when it loads an adapter; the export names those layers' weights in
    target_parameters instead, and peft then applies exactly the server's LoRA there."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend = family_backends("deepseek-v3")
    adapter_id = backend.add_lora(4, 8.0, ["gate_proj", "up_proj"], 3)["model_id"]
    _train(backend, [adapter_id], steps=2)
    saved = backend.save_adapter(adapter_id)
    config = json.loads((Path(saved["path"]) / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.gate_proj.weight" in config["target_parameters"]
    assert not config["target_modules"]
    tokens = backend.render_conversations([CONV])[0].input_tokens[None]
    with torch.no_grad(), use_adapters([adapter_id]):
        ours = torch.log_softmax(backend.model(input_ids=tokens).logits.float(), dim=-1)
    with torch.no_grad():
        base = torch.log_softmax(backend.model(input_ids=tokens).logits.float(), dim=-1)
    assert not torch.allclose(ours, base, atol=1e-3)
    fresh = AutoModelForCausalLM.from_pretrained(backend.loaded.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, saved["path"]).eval()
    with torch.no_grad():
        theirs = torch.log_softmax(peft_model(input_ids=tokens).logits.float(), dim=-1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    backend.remove_adapter(adapter_id)


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
def test_expert_lora_checkpoint_and_snapshot_round_trip(family, family_backends, tmp_path):
    """Expert A/B go through checkpoints (weights and optimizer moments; loaded into the
    adapter, or making a new one from it) and snapshots."""
    backend = family_backends(family)
    adapter_id = backend.add_lora(4, 8.0, ["gate_up_proj", "down_proj"], 4)["model_id"]
    _train(backend, [adapter_id], steps=2)
    tokens = backend.render_conversations([CONV])[0].input_tokens.tolist()
    before = _full_forward_logprobs(backend, adapter_id, tokens)
    backend.save_state(adapter_id, tmp_path / "ckpt", optimizer=True)
    snapshot_id = backend.snapshot(adapter_id, f"{adapter_id}-snap")["model_id"]
    _train(backend, [adapter_id], steps=1)
    assert not torch.allclose(_full_forward_logprobs(backend, adapter_id, tokens), before, atol=1e-6)
    torch.testing.assert_close(_full_forward_logprobs(backend, snapshot_id, tokens), before, rtol=0, atol=1e-6)
    backend.load_state(adapter_id, tmp_path / "ckpt", optimizer=True)
    torch.testing.assert_close(_full_forward_logprobs(backend, adapter_id, tokens), before, rtol=0, atol=1e-6)
    moments = backend.adapters.get(adapter_id).optimizer.state
    assert moments and all(state["exp_avg"].abs().sum() > 0 for state in moments.values())
    restored = backend.create_from_checkpoint(tmp_path / "ckpt", None, optimizer=True, trainable=True)["model_id"]
    torch.testing.assert_close(_full_forward_logprobs(backend, restored, tokens), before, rtol=0, atol=1e-6)
    for model_id in (adapter_id, snapshot_id, restored):
        backend.remove_adapter(model_id)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_over_http_train_mlp_trains_the_experts_and_the_head_is_a_target(family, family_root, tmp_path):
    """Tinker's train_mlp on an MoE model puts LoRA on the fused experts (and on the shared
    expert where there is one). The seed's /add_lora accepts the output head's name, as the
    engine does, and the expert weights' names."""
    from app import close_app, create_app

    app = create_app(family_config(family, family_root, thinker_data_dir=str(tmp_path), max_workers=1))
    try:
        client = app.test_client()
        name = app.extensions["thinker"].backend.loaded.name
        session = client.post("/api/v1/create_session", json={}).get_json()["session_id"]

        def create(seq: int, **lora) -> object:
            body = {"session_id": session, "model_seq_id": seq, "base_model": name, "lora_config": {"rank": 4, **lora}}
            return client.post("/api/v1/create_model", json=body)

        def created_targets(answer) -> set[str]:
            assert answer.status_code == 200, answer.get_json()
            request = {"request_id": answer.get_json()["request_id"]}
            for _ in range(10):  # long polls: each waits for the result
                result = client.post("/api/v1/retrieve_future", json=request).get_json()
                if result.get("type") != "try_again":
                    break
            assert "error" not in result, result
            return set(app.extensions["thinker"].backend.adapters.get(result["model_id"]).target_modules)

        assert EXPERT_WEIGHTS <= created_targets(create(0))
        assert not EXPERT_WEIGHTS & created_targets(create(1, train_mlp=False))
        backend = app.extensions["thinker"].backend
        head = backend.loaded.head_module
        answer = client.post("/add_lora", json={"rank": 4, "target_modules": [head, "q_proj"]})
        assert answer.status_code == 200, answer.get_json()
        experts = client.post("/add_lora", json={"rank": 4, "target_modules": ["gate_up_proj"]})
        assert experts.status_code == 200, experts.get_json()
    finally:
        close_app(app)
