"""FLOPs of a LoRA training step on a frozen base, and the peak they are measured against.

Model FLOPs utilisation (MFU) = the useful FLOPs of the real tokens / wall time / peak.
Counted per row of n real tokens (padding is waste, never useful work):

- base linear layers, every token: forward 2P, backward to the activations 2P (the base is
  frozen: no weight gradients), P = the 2-D weights of the model minus the token
  embedding and the output head (a tied head is the embedding: one tensor, counted once);
- attention, per layer: Q K^T and P V over the n(n+1)/2 causal pairs, 2 FLOPs x d_attn each,
  forward 4 d_attn per pair, backward (dQ, dK, dV, dP) twice that;
- LoRA, every token: forward 2 r (in + out) per wrapped layer = 2 x the adapter's parameter
  count, backward 2x for the activations and 2x for A and B;
- the output head, only at positions that carry loss (the others never go through it in the
  fast head path): logits 2 V H, gradient to the hidden state 2 V H.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device name, for MFU on a GPU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "4090": 165.0}


@dataclass(frozen=True)
class ModelShape:
    base_linear_params: int  # P: 2-D weights outside the embedding and the output head
    layers: int
    attention_dim: int  # heads x head_dim: the width Q K^T and P V run at
    head_params: int  # V x H of the output head

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        embed = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        head = getattr(out, "base", out).weight  # under a LoRA wrapper when LoRA may target it
        skip = {embed.data_ptr(), head.data_ptr()}
        linear = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.data_ptr() not in skip)
        return cls(linear, int(config.num_hidden_layers), heads * head_dim, head.numel())


@dataclass(frozen=True)
class Row:
    """One training sequence as the FLOP count sees it."""

    tokens: int  # real tokens (the model's input length)
    loss_tokens: int  # positions that go through the output head
    lora_params: int  # its adapter's parameter count (0: base model only)


def training_flops(shape: ModelShape, rows: Sequence[Row], causal: bool = True) -> float:
    """Useful FLOPs of one forward+backward over ``rows`` (see the module docstring).
    ``causal=False`` counts every (query, key) pair, as a dense attention kernel computes."""
    total = 0.0
    for row in rows:
        n = row.tokens
        pairs = n * (n + 1) / 2 if causal else n * n
        total += 4.0 * shape.base_linear_params * n
        total += 12.0 * shape.layers * shape.attention_dim * pairs
        total += 6.0 * row.lora_params * n
        total += 4.0 * shape.head_params * row.loss_tokens
    return total


def rows_of(backend, requests) -> list[Row]:
    """The rows of FwdBwdRequests, with each one's adapter size (public describe())."""
    sizes = {}
    rows = []
    for request in requests:
        if request.adapter_id not in sizes:
            adapter = request.adapter_id and backend.adapters.get(request.adapter_id).describe()
            sizes[request.adapter_id] = adapter["num_parameters"] if adapter else 0
        for ex in request.examples:
            rows.append(Row(ex.length, ex.num_loss_tokens, sizes[request.adapter_id]))
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, size: int = 2048, reps: int = 5) -> float:
    """What this machine achieves on a big square matmul in the dtype the model runs in (fp32
    on CPU, bf16 on GPU): the practical peak a CPU's MFU is quoted against. Median of reps."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size * 4 if device.type == "cuda" else size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times) / 1e12


def device_peak_tflops(device: torch.device) -> float | None:
    """The datasheet bf16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
