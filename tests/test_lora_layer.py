"""The multi-adapter LoRA layer on its own: token routing, the segmented layer against a
per-adapter reference (outputs and gradients, any input shape), Conv1D and biased heads, and
the compute-dtype copies. Routing on whole models is in test_lora.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from backend import AdamParams, FwdBwdRequest
from backend.lora.layer import MultiLoraLinear, wrap_linear_layers
from backend.lora.routing import Routing, use_adapters
from backend.model.loading import wrap_for_lora

pytestmark = pytest.mark.unit

def test_routing_gives_each_adapter_its_tokens():
    routing = Routing.build(["a", "a", None, "b", "b"])  # every adapter's rows in one run
    assert routing.adapters == ("a", "b") and not routing.uniform
    segments = routing.segments(5 * 3)  # 3 tokens per row
    assert (segments["a"].start, segments["a"].end, segments["a"].contiguous) == (0, 6, True)
    assert (segments["b"].start, segments["b"].end) == (9, 15)
    assert routing.segments(15) is segments  # built once per token count, then reused
    interleaved = Routing.build(["a", None, "b", "a"]).segments(8)  # 2 tokens per row
    assert interleaved["a"].index_S.tolist() == [0, 1, 6, 7] and interleaved["b"].contiguous
    with pytest.raises(RuntimeError, match="covers 4 rows but the layer's input has 7 tokens"):
        Routing.build(["a", None, "b", "a"]).segments(7)
    assert Routing.build(["a", "a"]).segments(7)["a"].covers(7)  # one adapter: any token count
    assert Routing.build([None, None]).uniform and not Routing.build([None]).segments(3)


# ---- the layer alone, against PEFT's formula adapter by adapter ------------------------------

# (rank, alpha, which of the three layers it targets)
SPECS = {"r4": (4, 8.0, (0, 1, 2)), "r8": (8, 16.0, (0, 1, 2)), "r16": (16, 4.0, (0, 2))}


def _stack(seed: int = 0) -> list[MultiLoraLinear]:
    """A Linear, a Conv1D (weight (in, out)) and a head-like Linear with a bias, each wrapped,
    with the adapters of SPECS (B non-zero so every adapter changes the output)."""
    torch.manual_seed(seed)
    bases = [nn.Linear(16, 24), Conv1D(32, 24), nn.Linear(32, 20, bias=True)]
    for conv in bases[1:2]:
        nn.init.normal_(conv.weight, std=0.2)
    layers = [MultiLoraLinear(base.requires_grad_(False), f"l{i}") for i, base in enumerate(bases)]
    generator = torch.Generator().manual_seed(seed)
    for adapter_id, (rank, alpha, targets) in SPECS.items():
        for i in targets:
            layers[i].add_adapter(adapter_id, rank, alpha, generator)
            with torch.no_grad():
                layers[i].lora_B[adapter_id].normal_(generator=generator)
    return layers


def _reference(layers: list[MultiLoraLinear], x_BTI: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """PEFT's y = W x + s * B (A x), one row at a time with that row's adapter alone."""
    outs = []
    for b, adapter_id in enumerate(rows):
        h = x_BTI[b]
        for layer in layers:
            y = layer.base(h)
            if adapter_id in layer.lora_A:
                a, bb = layer.lora_A[adapter_id], layer.lora_B[adapter_id]
                y = y + layer.scaling[adapter_id] * ((h @ a.t()) @ bb.t())
            h = y
        outs.append(h)
    return torch.stack(outs)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference, relative to the largest value (fp32 sums in another order differ
    by a few ulps of the largest terms)."""
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0)) if got.numel() else 0.0


def _grads_of(layers: list[MultiLoraLinear]) -> dict[str, torch.Tensor]:
    found = {}
    for i, layer in enumerate(layers):
        for name, params in (("A", layer.lora_A), ("B", layer.lora_B)):
            for adapter_id, p in params.items():
                found[f"{i}.{name}.{adapter_id}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                p.grad = None
    return found


@pytest.mark.parametrize(
    "rows",
    [
        ["r4", "r4", "r8", None, "r16", "r16"],  # each adapter in one run: contiguous segments
        ["r4", None, "r16", "r8", "r4", "r16"],  # interleaved: index segments
        ["r8", "r8", "r8", "r8", "r8", "r8"],  # one adapter
    ],
)
@pytest.mark.parametrize("flatten", [False, True])  # (B, T, in) like most models, (B*T, in) like OPT's fc1
def test_segmented_layers_match_each_adapter_alone_with_gradients(rows, flatten):
    layers = _stack()
    B, T = len(rows), 5
    x_BTI = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(3))
    weights_BTO = torch.randn(B, T, 20, generator=torch.Generator().manual_seed(4))

    with use_adapters(Routing.build(rows, tokens_per_row=T)):
        h = x_BTI.reshape(B * T, 16) if flatten else x_BTI
        for layer in layers:
            h = layer(h)
    fused_BTO = h.reshape(B, T, 20)
    (fused_BTO * weights_BTO).sum().backward()
    fused_grads = _grads_of(layers)

    reference_BTO = _reference(layers, x_BTI, rows)
    (reference_BTO * weights_BTO).sum().backward()
    reference_grads = _grads_of(layers)

    assert _relative_error(fused_BTO.detach(), reference_BTO.detach()) <= 1e-6
    for key, grad in reference_grads.items():
        assert _relative_error(fused_grads[key], grad) <= 1e-6, key
        if key.rsplit(".", 1)[1] not in rows:  # an adapter with no rows gets no gradient
            assert not fused_grads[key].any(), key


@pytest.mark.parametrize(
    "rows", [["r4", "r4", "r8", None, "r16", "r16"], ["r4", None, "r16", "r8", "r4", "r16"]]
)
def test_sampling_without_autograd_adds_the_same_lora_as_training(rows):
    """The no-grad path (scale on the expand, no saved activations) equals each adapter alone."""
    layers = _stack()
    x_BTI = torch.randn(len(rows), 3, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), use_adapters(Routing.build(rows, tokens_per_row=3)):
        h = x_BTI
        for layer in layers:
            h = layer(h)
    with torch.no_grad():
        reference_BTO = _reference(layers, x_BTI, rows)
    assert not h.requires_grad
    assert _relative_error(h, reference_BTO) <= 1e-6


def test_a_layer_no_routed_adapter_targets_returns_the_base_output_whatever_its_shape():
    """OPT's fc1/fc2 and an MoE's shared expert see (B*T, in); tokens an MoE routes to an
    expert are any number. Without a routed adapter on the layer, nothing is checked."""
    layer = _stack()[2]  # r4 and r8 target it, r16 too: route adapters it does not have
    layer.remove_adapter("r16")
    x_NI = torch.randn(112, 32)
    with torch.no_grad(), use_adapters(Routing.build([None, "r16"])):  # 2 rows, 112 tokens
        assert torch.equal(layer(x_NI), layer.base(x_NI))


def test_conv1d_and_biased_heads_are_wrapped():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model.lm_head = nn.Linear(16, 64, bias=True)  # a head with a bias still takes LoRA
    layers, names, head = wrap_for_lora(model)
    assert names == ["c_attn", "c_fc", "c_proj"] and head == "lm_head"
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.fan_in_fan_out and (attn.in_features, attn.out_features) == (16, 48)
    assert not layers["lm_head"].fan_in_fan_out and layers["lm_head"].base.bias is not None


def test_bf16_compute_copies_are_kept_refreshed_and_released():
    """A bf16 model computes the branch in bf16 from fp32 masters, through a slot buffer
    kept across calls and rebuilt when the master changes; the gradient reaches the fp32
    master."""
    layer = _stack()[0]
    layer.base.to(torch.bfloat16)
    x_NI = torch.randn(4, 16, dtype=torch.bfloat16)

    def expected() -> torch.Tensor:
        a, b = layer.lora_A["r8"].to(torch.bfloat16), layer.lora_B["r8"].to(torch.bfloat16)
        return layer.base(x_NI).addmm_((x_NI @ a.t()) * layer.scaling["r8"], b.t())  # bf16 throughout

    with torch.no_grad(), use_adapters(["r8"]):
        first = layer(x_NI)
        buffer = layer._compute["r8"][1]
        assert buffer.dtype == torch.bfloat16 and layer.lora_A["r8"].dtype == torch.float32
        layer(x_NI)
        assert layer._compute["r8"][1] is buffer  # kept: no cast per call
        torch.testing.assert_close(first, expected(), rtol=0, atol=0)
        layer.lora_B["r8"].mul_(2)  # an optimizer step, in place
        torch.testing.assert_close(layer(x_NI), expected(), rtol=0, atol=0)
        assert layer._compute["r8"][1] is not buffer
    layer.release_compute_copy("r8")
    assert "r8" not in layer._compute
    x_leaf = x_NI.clone().requires_grad_()
    with use_adapters(["r8"]):
        layer(x_leaf).float().sum().backward()
    assert layer._compute["r8"][1].dtype == torch.bfloat16  # training reads the slot buffer too
    got = [layer.lora_A["r8"].grad, layer.lora_B["r8"].grad, x_leaf.grad]
    assert [g.dtype for g in got] == [torch.float32, torch.float32, torch.bfloat16]
    a, b, x_ref = (t.detach().clone().requires_grad_() for t in (layer.lora_A["r8"], layer.lora_B["r8"], x_NI))
    branch = (x_ref @ a.to(torch.bfloat16).t()) * layer.scaling["r8"] @ b.to(torch.bfloat16).t()
    (layer.base(x_ref) + branch).float().sum().backward()
    for g, want in zip(got, [a.grad, b.grad, x_ref.grad], strict=True):  # PEFT-style autograd, cast in the graph
        torch.testing.assert_close(g.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_wrap_linear_layers_wraps_conv1d_by_name():
    model = nn.Sequential()
    model.add_module("c_fc", Conv1D(8, 4))
    model.add_module("other", nn.Linear(8, 8))
    assert list(wrap_linear_layers(model, ["c_fc"])) == ["c_fc"]
    assert isinstance(model.c_fc, MultiLoraLinear) and isinstance(model.other, nn.Linear)



def test_a_fused_optimizer_step_reaches_the_bf16_slot_buffers(backend):
    """Fused AdamW writes the weights without bumping their version counters: the step
    itself must release the stepped adapter's buffers, or sampling would use old weights."""
    layer = _stack()[0]
    layer.base.to(torch.bfloat16)
    x_NI = torch.randn(4, 16, dtype=torch.bfloat16)
    masters = [layer.lora_A["r8"], layer.lora_B["r8"]]
    optimizer = torch.optim.AdamW(masters, lr=0.1, fused=True)
    with torch.no_grad(), use_adapters(["r8"]):
        before = layer(x_NI)
    for p in masters:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in masters]
    optimizer.step()
    assert [p._version for p in masters] == versions  # why versions alone cannot tell
    layer.release_compute_copy("r8")  # what the backend's after-step hook does
    with torch.no_grad(), use_adapters(["r8"]):
        assert not torch.equal(layer(x_NI), before)

    # The backend wires it: a step releases the adapter's buffers in every layer it has.
    adapter_id = backend.add_lora(4, 8.0, None, 123)["model_id"]
    adapter = backend.adapters.get(adapter_id)
    first = backend.loaded.lora_layers[adapter.layer_names[0]]
    released = first._released.get(adapter_id, 0)
    hello = [[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi Alice!"}]]
    backend.forward_backward([FwdBwdRequest(adapter_id, backend.render_conversations(hello))])
    backend.optim_step(adapter_id, AdamParams(learning_rate=1e-3))
    assert first._released.get(adapter_id, 0) == released + 1
