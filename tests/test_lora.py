"""Multi-adapter LoRA on whole models: mixed batches, gradient and thread isolation, one
routing for body and head, GPT-2 (Conv1D) and an MoE's flattened shared expert end to end.
The layer on its own is in test_lora_layer.py."""

from __future__ import annotations

import threading

import pytest
import torch

from backend import FwdBwdRequest
from backend.lora.routing import Routing, use_adapters
from backend.model.loading import wrap_for_lora

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi Alice!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, a longer answer here."},
    ],
]


def _make_adapter(backend, rank: int, alpha: float, seed: int, targets=None) -> str:
    adapter_id = backend.add_lora(rank, alpha, targets, seed)["model_id"]
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # B starts at zero; make it non-zero so the adapter matters
        for p in backend.adapters.get(adapter_id).params[1::2]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return adapter_id


def _grads(backend, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in backend.adapters.get(adapter_id).params]


def _zero(backend, *adapter_ids: str) -> None:
    for adapter_id in adapter_ids:
        backend.adapters.get(adapter_id).optimizer.zero_grad(set_to_none=True)



def test_new_adapter_leaves_the_base_model_unchanged(backend):
    adapter_id = backend.add_lora(8, 16, None, 1)["model_id"]
    tokens = torch.tensor([backend.render_prompts(["Hello there"])[0]])
    with torch.no_grad():
        base = backend.model(input_ids=tokens).logits
        with use_adapters([adapter_id]):
            adapted = backend.model(input_ids=tokens).logits
    torch.testing.assert_close(adapted, base, rtol=0, atol=0)


def test_fused_batch_of_different_ranks_matches_each_adapter_alone(backend):
    specs = [(4, 8.0), (8, 16.0), (16, 4.0)]
    ids = [_make_adapter(backend, rank, alpha, seed=10 + i) for i, (rank, alpha) in enumerate(specs)]
    bystander = _make_adapter(backend, 8, 16.0, seed=99)
    examples = backend.render_conversations(CONVERSATIONS)
    requests = [
        FwdBwdRequest(ids[0], examples[:2]),
        FwdBwdRequest(ids[1], examples[2:]),
        FwdBwdRequest(ids[2], examples),
    ]

    _zero(backend, *ids, bystander)
    fused = backend.forward_backward(requests)
    fused_grads = {a: _grads(backend, a) for a in ids}
    assert all(g is None for g in _grads(backend, bystander)), "an adapter with no rows got gradients"

    for request, fused_result in zip(requests, fused, strict=True):
        _zero(backend, *ids)
        alone = backend.forward_backward([request])[0]
        assert alone["loss"] == pytest.approx(fused_result["loss"], abs=1e-5)
        assert alone["num_tokens"] == fused_result["num_tokens"]
        for g_alone, g_fused in zip(_grads(backend, request.adapter_id), fused_grads[request.adapter_id], strict=True):
            torch.testing.assert_close(g_fused, g_alone, rtol=0, atol=1e-5)
    _zero(backend, *ids)


def test_rows_for_the_base_model_get_no_adapter(backend):
    adapter_id = _make_adapter(backend, 8, 16.0, seed=5)
    tokens = torch.tensor(backend.render_prompts(["abc", "xyz"]))  # same length: no padding
    with torch.no_grad():
        base = backend.model(input_ids=tokens).logits
        with use_adapters([None, adapter_id]):
            mixed = backend.model(input_ids=tokens).logits
        with use_adapters([adapter_id, adapter_id]):
            adapted = backend.model(input_ids=tokens).logits
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-5)
    assert not torch.allclose(adapted[1], base[1], atol=1e-4)


def test_adapter_targeting_some_modules_only(backend):
    adapter_id = _make_adapter(backend, 4, 8.0, seed=7, targets=["q_proj", "v_proj"])
    adapter = backend.adapters.get(adapter_id)
    assert adapter.layer_names and all(n.endswith(("q_proj", "v_proj")) for n in adapter.layer_names)
    result = backend.forward_backward([FwdBwdRequest(adapter_id, backend.render_conversations(CONVERSATIONS[:1]))])
    assert result[0]["loss"] > 0
    assert all(p.grad is not None for p in adapter.params)
    _zero(backend, adapter_id)


def test_concurrent_forwards_on_threads_never_see_each_others_adapter(backend):
    ids = [_make_adapter(backend, 8, 16.0, seed=20 + i) for i in range(3)]
    tokens = torch.tensor([backend.render_prompts(["The same prompt for everyone"])[0]])
    with torch.no_grad():
        expected = {}
        for adapter_id in ids:
            with use_adapters([adapter_id]):
                expected[adapter_id] = backend.model(input_ids=tokens).logits
    mismatches: list[str] = []

    def run(adapter_id: str) -> None:
        for _ in range(15):
            with torch.no_grad(), use_adapters([adapter_id]):
                logits = backend.model(input_ids=tokens).logits
            if not torch.allclose(logits, expected[adapter_id], atol=1e-5):
                mismatches.append(adapter_id)

    threads = [threading.Thread(target=run, args=(a,)) for a in ids for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches


def test_interleaved_rows_of_different_ranks_match_each_row_alone(backend):
    ids = [_make_adapter(backend, rank, alpha, seed=60 + rank) for rank, alpha in ((2, 4.0), (8, 32.0), (32, 8.0))]
    order = [ids[0], ids[1], None, ids[2], ids[0], ids[2]]
    tokens = torch.tensor(backend.render_prompts(["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff"]))  # equal lengths
    with torch.no_grad(), use_adapters(order):
        fused = backend.model(input_ids=tokens).logits
    for b, adapter_id in enumerate(order):
        with torch.no_grad(), use_adapters([adapter_id]):
            alone = backend.model(input_ids=tokens[b : b + 1]).logits
        torch.testing.assert_close(fused[b : b + 1], alone, rtol=0, atol=1e-5)


def test_one_routing_serves_the_body_and_a_head_that_sees_one_token_per_row(backend):
    """Decode-style: the routing is built for the prompt's length; the head (logits_to_keep=1)
    sees one token per row and gets segments of its own from the same object."""
    x, y = (_make_adapter(backend, rank, 8.0, seed=80 + rank, targets=["q_proj", "lm_head"]) for rank in (4, 8))
    tokens = torch.tensor(backend.render_prompts(["abcd", "wxyz", "klmn"]))
    rows = [x, None, y]
    routing = Routing.build(rows, "cpu", tokens_per_row=tokens.shape[1])
    with torch.no_grad(), use_adapters(routing):
        last = backend.model(input_ids=tokens, logits_to_keep=1).logits[:, -1]
    for b, adapter_id in enumerate(rows):
        with torch.no_grad(), use_adapters([adapter_id]):
            alone = backend.model(input_ids=tokens[b : b + 1]).logits[0, -1]
        torch.testing.assert_close(last[b], alone, rtol=0, atol=1e-5)


# ---- a Conv1D model end to end: GPT-2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_backend(tmp_path_factory):
    """A tiny random GPT-2 (Conv1D layers: weight (in, out)) served in this process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from backend.hf_backend import HFBackend
    from backend.model.builtin_tiny import build_tokenizer, write_model_once
    from backend.model.loading import load_base_model
    from thinker.core.config import Config

    def build():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=260, n_positions=128, n_embd=32, n_layer=2, n_head=2, eos_token_id=2)
        return GPT2LMHeadModel(config), build_tokenizer()

    folder = write_model_once(tmp_path_factory.mktemp("models") / "gpt2-tiny", build)
    cache = tmp_path_factory.mktemp("gpt2-cache")
    loaded = load_base_model(Config(base_model=str(folder), thinker_cache_dir=str(cache), device="cpu"))
    return HFBackend(loaded, tmp_path_factory.mktemp("gpt2-data"))


def test_gpt2_conv1d_adapters_train_fused_and_export_to_peft(gpt2_backend, tmp_path):
    backend = gpt2_backend
    assert {"c_attn", "c_proj", "c_fc"} <= set(backend.loaded.target_modules)
    ids = [_make_adapter(backend, rank, 8.0, seed=40 + rank) for rank in (4, 8)]
    examples = backend.render_conversations(CONVERSATIONS)
    requests = [FwdBwdRequest(ids[0], examples[:1]), FwdBwdRequest(ids[1], examples[1:])]
    fused = backend.forward_backward(requests)
    fused_grads = {a: _grads(backend, a) for a in ids}
    for request, fused_result in zip(requests, fused, strict=True):
        _zero(backend, *ids)
        alone = backend.forward_backward([request])[0]
        assert alone["loss"] == pytest.approx(fused_result["loss"], abs=1e-5)
        for g_alone, g_fused in zip(_grads(backend, request.adapter_id), fused_grads[request.adapter_id], strict=True):
            torch.testing.assert_close(g_fused, g_alone, rtol=0, atol=1e-5)
    _zero(backend, *ids)

    # The PEFT export of a Conv1D adapter loads into PEFT and gives the server's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backend.lora.peft_files import save_peft_adapter

    adapter = backend.adapters.get(ids[1])
    folder = save_peft_adapter(adapter, backend.loaded.lora_layers, backend.loaded.path, tmp_path / "export")
    tokens = torch.tensor([backend.render_prompts(["Hello there"])[0]])
    with torch.no_grad(), use_adapters([ids[1]]):
        served = backend.model(input_ids=tokens).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backend.loaded.path), str(folder))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, served, rtol=0, atol=1e-5)


def test_gpt2_decode_batch_of_mixed_adapters_matches_each_row_alone(gpt2_backend):
    """Interleaved rows (index segments) and a head that sees one token per row, on Conv1D."""
    from backend.sample.decode import generate
    from backend.sample.sampling import SampleRow, SamplingParams

    backend = gpt2_backend
    x, y = (_make_adapter(backend, rank, 8.0, seed=90 + rank, targets=["c_attn", "c_fc", "lm_head"]) for rank in (4, 8))
    params = SamplingParams(max_tokens=5, temperature=0.0, stop_at_eos=False)
    prompts = backend.render_prompts(["Hi", "A longer prompt", "Yo", "Hey"])
    rows = [SampleRow(a, p, params) for a, p in zip([x, None, y, x], prompts, strict=True)]

    def run(batch):
        return [c.tokens for c in generate(backend.model, backend.tokenizer, batch, backend.eos_ids, 128, "cpu")]

    assert run(rows) == [run([row])[0] for row in rows]


def test_moe_shared_expert_sees_flattened_tokens_and_mixed_rows_match_each_row_alone():
    """Qwen2-MoE's shared expert gets (B*T, H): the reported 'covers 2 rows but the batch
    has 112' failure, for every request once any adapter existed."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2,
    )
    model = Qwen2MoeForCausalLM(config).eval().requires_grad_(False)
    layers, names, _ = wrap_for_lora(model)
    assert any("shared_expert" in path for path in layers)
    generator = torch.Generator().manual_seed(1)
    for adapter_id, (rank, targets) in {"x": (4, None), "y": (8, {"gate_proj", "up_proj", "down_proj"})}.items():
        for path, layer in layers.items():
            if path != "lm_head" and (targets is None or path.rsplit(".", 1)[1] in targets):
                layer.add_adapter(adapter_id, rank, 8.0, generator)
                with torch.no_grad():
                    layer.lora_B[adapter_id].normal_(std=0.1, generator=generator)
    ids_BT = torch.randint(0, 64, (3, 7), generator=generator)
    rows = ["x", None, "y"]
    with torch.no_grad(), use_adapters(Routing.build(rows, tokens_per_row=7)):
        fused = model(input_ids=ids_BT).logits
    for b, adapter_id in enumerate(rows):
        with torch.no_grad(), use_adapters([adapter_id]):
            alone = model(input_ids=ids_BT[b : b + 1]).logits
        torch.testing.assert_close(fused[b : b + 1], alone, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = model(input_ids=ids_BT[:2]).logits
        with use_adapters(Routing.build([None, "nobody"])):  # an adapter no layer has: the base model
            torch.testing.assert_close(model(input_ids=ids_BT[:2]).logits, base, rtol=0, atol=0)
