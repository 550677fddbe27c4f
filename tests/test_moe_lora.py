"""Per-expert LoRA on fused MoE expert weights (backend/lora/experts.py), at the layer:
mixed batches equal each adapter alone, gradients equal a naive per-(token, expert) loop,
an adapter that does not target the experts leaves the base output exactly as it was,
and the PEFT layout of expert weights goes out and back unchanged."""

from __future__ import annotations

import pytest
import torch

from backend.lora.adapters import LiveAdapters
from backend.lora.experts import ExpertLora, grouped_linear, is_fused_experts, wrap_experts
from backend.lora.peft_files import read_peft_adapter, save_peft_adapter
from backend.lora.routing import use_adapters

pytestmark = pytest.mark.unit

B, T, E, K = 3, 5, 4, 2  # rows, tokens per row, experts, experts per token


def _experts(family: str) -> torch.nn.Module:
    """A fused experts module with random weights: Qwen3-MoE's (E, out, in) layout, or
    GPT-OSS's transposed (E, in, out) with biases and its own interleaved gate."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    if family == "qwen3-moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config = AutoConfig.for_model("qwen3_moe", hidden_size=16, moe_intermediate_size=12, num_experts=E)
        module = Qwen3MoeExperts(config)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        config = AutoConfig.for_model("gpt_oss", hidden_size=16, intermediate_size=12, num_local_experts=E)
        module = GptOssExperts(config)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
        p.requires_grad_(False)
    return module


class Holder(torch.nn.Module):
    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.experts = experts


def _setup(family: str, ranks: dict[str, int]):
    """Wrapped experts plus one adapter per ``ranks`` entry, trained away from B = 0."""
    model = Holder(_experts(family))
    layers = wrap_experts(model)
    registry = LiveAdapters(layers)
    for i, (adapter_id, rank) in enumerate(ranks.items()):
        adapter = registry.create(rank, 2.0 * rank, ["gate_up_proj", "down_proj"], i, adapter_id=adapter_id)
        with torch.no_grad():
            for p in adapter.params:
                p.normal_(std=0.2)
    return model, layers, registry


def _inputs(requires_grad: bool = False):
    generator = torch.Generator().manual_seed(1)
    hidden_NH = torch.randn(B * T, 16, generator=generator, requires_grad=requires_grad)
    scores_NE = torch.randn(B * T, E, generator=generator)
    weights_NK, index_NK = torch.topk(torch.softmax(scores_NE, -1), K, dim=-1)
    return hidden_NH, index_NK, weights_NK


def _reference(model, layers, rows: list[str | None], hidden_NH, index_NK, weights_NK) -> torch.Tensor:
    """The naive computation: every (token, slot) pair on its own, W_e + scale * B_e @ A_e."""
    experts = model.experts
    gate_up, down = layers["experts.gate_up_proj"], layers["experts.down_proj"]
    out = []
    for n in range(B * T):
        adapter = rows[n // T]
        total = torch.zeros(16)
        for k in range(K):
            e = int(index_NK[n, k])
            h = hidden_NH[n]
            for lora, bias_name in ((gate_up, "gate_up_proj_bias"), (down, "down_proj_bias")):
                w = lora.weight[e] if lora.transposed else lora.weight[e].t()  # (in, out)
                y = h @ w
                if getattr(experts, "has_bias", False):
                    y = y + getattr(experts, bias_name)[e]
                if adapter in lora.lora_A:
                    y = y + lora.scaling[adapter] * (h @ lora.lora_A[adapter][e].t()) @ lora.lora_B[adapter][e].t()
                h = experts._apply_gate(y[None])[0] if lora is gate_up else y
            total = total + weights_NK[n, k] * h
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
def test_base_rows_and_untargeting_adapters_keep_the_base_output(family):
    model, _, registry = _setup(family, {"a": 4})
    hidden_NH, index_NK, weights_NK = _inputs()
    with torch.no_grad():
        base = type(model.experts).forward(model.experts, hidden_NH, index_NK, weights_NK)  # the original forward
        assert torch.equal(model.experts(hidden_NH, index_NK, weights_NK), base)  # no routing at all
        with use_adapters(["other", None, "other"]):  # routed adapters, none on these experts
            assert torch.equal(model.experts(hidden_NH, index_NK, weights_NK), base)
        with use_adapters([None, "a", None]):  # base rows beside an adapter's row: the grouped path
            mixed = model.experts(hidden_NH, index_NK, weights_NK)
    from transformers.integrations.moe import grouped_mm_experts_forward  # what loaded models run by default

    with torch.no_grad():
        eager = type(model.experts).forward.__wrapped__(model.experts, hidden_NH, index_NK, weights_NK)
        grouped = grouped_mm_experts_forward(model.experts, hidden_NH, index_NK, weights_NK)
    for reference in (base, eager, grouped):
        torch.testing.assert_close(mixed[:T], reference[:T], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[2 * T :], reference[2 * T :], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[T : 2 * T], base[T : 2 * T], atol=1e-3)
    assert registry.get("a").layer_names == ["experts.down_proj", "experts.gate_up_proj"]


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
@pytest.mark.parametrize("ranks", [{"a": 4, "b": 8}, {"a": 2, "b": 3}])  # grouped_mm; the per-expert fallback
def test_mixed_batch_equals_each_adapter_alone_and_the_naive_loop(family, ranks):
    model, layers, _ = _setup(family, ranks)
    hidden_NH, index_NK, weights_NK = _inputs()
    rows = ["a", None, "b"]
    with torch.no_grad(), use_adapters(rows):
        mixed = model.experts(hidden_NH, index_NK, weights_NK)
    for r, adapter in enumerate(rows):
        with torch.no_grad(), use_adapters([adapter] * B):
            alone = model.experts(hidden_NH, index_NK, weights_NK)
        torch.testing.assert_close(mixed[r * T : (r + 1) * T], alone[r * T : (r + 1) * T], rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = _reference(model, layers, rows, hidden_NH, index_NK, weights_NK)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
def test_gradients_match_the_naive_loop(family):
    model, layers, registry = _setup(family, {"a": 4, "b": 2})
    params = registry.get("a").params + registry.get("b").params
    rows = ["b", "a", None]
    hidden_NH, index_NK, weights_NK = _inputs(requires_grad=True)
    g_NH = torch.randn(B * T, 16, generator=torch.Generator().manual_seed(2))

    with use_adapters(rows):
        (model.experts(hidden_NH, index_NK, weights_NK) * g_NH).sum().backward()
    got = [p.grad.clone() for p in params] + [hidden_NH.grad.clone()]
    for p in [*params, hidden_NH]:
        p.grad = None
    (_reference(model, layers, rows, hidden_NH, index_NK, weights_NK) * g_NH).sum().backward()
    expected = [p.grad for p in params] + [hidden_NH.grad]
    for g, e in zip(got, expected, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_grouped_linear_fallback_equals_grouped_mm():
    x_SK = torch.randn(9, 8)
    w_EKN = torch.randn(E, 8, 4)
    counts_E = torch.tensor([3, 0, 4, 2])
    grouped = grouped_linear(x_SK, w_EKN, counts_E)  # 16-byte rows: one grouped_mm
    loop = torch.cat([x_SK[:3] @ w_EKN[0], x_SK[3:7] @ w_EKN[2], x_SK[7:] @ w_EKN[3]])
    torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-6)
    odd = grouped_linear(x_SK[:, :3], w_EKN[:, :3, :3], counts_E)  # 12-byte rows: the loop
    torch.testing.assert_close(odd, torch.cat([x_SK[:3, :3] @ w_EKN[0, :3, :3], x_SK[3:7, :3] @ w_EKN[2, :3, :3],
                                               x_SK[7:, :3] @ w_EKN[3, :3, :3]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets", [["gate_up_proj", "down_proj"], ["down_proj"], ["gate_up_proj"]])
def test_peft_layout_goes_out_and_back(targets, tmp_path):
    """PEFT's lora_A (E*r, in) / lora_B (out, r*E) with nested wrapper keys, and back."""
    model, layers, registry = _setup("qwen3-moe", {})
    adapter = registry.create(4, 8.0, targets, 3, adapter_id="x")
    with torch.no_grad():
        for p in adapter.params:
            p.normal_()
    save_peft_adapter(adapter, layers, "base", tmp_path)
    config, tensors = read_peft_adapter(tmp_path)
    assert config["target_modules"] == sorted(targets)
    assert sorted(tensors) == adapter.layer_names
    for name in adapter.layer_names:
        layer: ExpertLora = layers[name]
        assert torch.equal(tensors[name]["A"], layer.lora_A["x"].detach())
        assert torch.equal(tensors[name]["B"], layer.lora_B["x"].detach())


def test_bf16_model_reads_slot_buffers_and_trains_the_fp32_masters():
    """On a bf16 model the branch computes from bf16 slot buffers made once (not per pass),
    remade after a release (an optimizer step); gradients land on the fp32 masters."""
    model, layers, registry = _setup("qwen3-moe", {"a": 8})
    model.to(torch.bfloat16)
    hidden_NH, index_NK, weights_NK = _inputs()
    hidden_NH, weights_NK = hidden_NH.bfloat16(), weights_NK.bfloat16()
    gate_up = layers["experts.gate_up_proj"]
    with use_adapters(["a"] * B):
        out = model.experts(hidden_NH, index_NK, weights_NK)
        buffer = gate_up._compute["a"][1]
        out.float().pow(2).sum().backward()
        again = model.experts(hidden_NH, index_NK, weights_NK)
    assert gate_up._compute["a"][1] is buffer and buffer.dtype == torch.bfloat16
    torch.testing.assert_close(again, out)
    adapter = registry.get("a")
    for p in adapter.params:
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    registry.release_compute_copies(adapter)
    assert "a" not in gate_up._compute
    fp32 = _setup("qwen3-moe", {"a": 8})[0]
    with torch.no_grad(), use_adapters(["a"] * B):
        expected = fp32.experts(hidden_NH.float(), index_NK, weights_NK.float())
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_only_experts_of_the_layout_computed_here_are_wrapped():
    """A norm after each expert (has_post_expert_norm), no gate, or a class transformers did
    not declare as fused experts: left alone (loading names their weights in the 400)."""
    assert is_fused_experts(_experts("qwen3-moe")) and is_fused_experts(_experts("gpt-oss"))
    for attribute, value in [("has_post_expert_norm", True), ("has_gate", False)]:
        module = _experts("qwen3-moe")
        setattr(module, attribute, value)
        assert not is_fused_experts(module)
        assert wrap_experts(Holder(module)) == {}
    undeclared = _experts("qwen3-moe")
    del undeclared.is_transposed
    assert not is_fused_experts(undeclared)


def test_loading_names_expert_weights_it_cannot_wrap():
    from backend.model.loading import _restrict_targets

    module = _experts("qwen3-moe")
    module.has_post_expert_norm = True
    model = torch.nn.Module()
    model.mlp = Holder(module)
    targets, unsupported, experts = _restrict_targets(model, {}, ["down_proj", "q_proj"])  # a linear down_proj too
    assert targets == ["down_proj", "q_proj"]
    assert experts == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert set(unsupported) == {"gate_up_proj"}
    assert "mlp.experts.gate_up_proj" in unsupported["gate_up_proj"]


def _saved_bytes(fn, weights) -> int:
    """Bytes of the distinct storages autograd keeps for backward, weights left out."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_for_backward_is_one_copy_of_the_inputs_whatever_the_adapter_mix():
    """A fused pass keeps what one adapter on the same tokens keeps (but its offsets), and LoRA adds to the
    model's own forward no more than the two projections' inputs gathered once, the rank-r
    h and the index tensors (no (pairs, out) product is kept, as index_add would keep it)."""
    model, _, registry = _setup("qwen3-moe", {"a": 4, "b": 4})
    weights = [*model.experts.parameters(), *registry.get("a").params, *registry.get("b").params]
    hidden_NH, index_NK, weights_NK = _inputs(requires_grad=True)

    def run(rows):
        with use_adapters(rows):
            model.experts(hidden_NH, index_NK, weights_NK)

    fused, one = _saved_bytes(lambda: run(["a", "b", "a"]), weights), _saved_bytes(lambda: run(["a"] * B), weights)
    eager = _saved_bytes(lambda: type(model.experts).forward(model.experts, hidden_NH, index_NK, weights_NK), weights)
    P, H, inner, r = B * T * K, 16, 12, 4
    assert one <= fused <= one + 4 * E * 8  # the second adapter's own per-expert offsets, no more
    assert one <= eager + 4 * P * (H + inner + 2 * r) + 8 * P * 4
