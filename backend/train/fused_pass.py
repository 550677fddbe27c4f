"""One fused forward(+backward) over the rows of many requests, each on its own adapter.

Every request keeps its own loss function, config and reduction; its loss is computed on
its own rows only, so it equals what running it alone gives, and its gradient lands on its
own adapter. The caller (the engine) validates requests, counts and retries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backend.failures import is_out_of_memory
from backend.lora.flat import owner_of as flat_owner_of
from backend.lora.routing import Routing, use_adapters
from backend.train import varlen
from backend.train.examples import Example
from backend.train.losses import LOSS_FUNCTIONS, get_loss_function
from backend.train.output_head import head_target_logprobs
from backend.train.packing import PackedLayout, pack, pack_one_row, packing_mode
from thinker.core.errors import BadRequestError


@dataclass(frozen=True)
class FwdBwdRequest:
    adapter_id: str | None  # None: the base model alone (forward only)
    examples: list[Example]
    loss_fn: str = "cross_entropy"
    loss_config: Mapping[str, float] = field(default_factory=dict)  # complete: defaults filled in
    reduction: str = "mean"  # "mean": divide by the total weight (the seed API); "sum": Tinker's
    backward: bool = True  # False: forward only, no gradient (Tinker's forward)
    return_logprobs: bool = False  # per-example target logprobs in the result


def describe_size(request: FwdBwdRequest) -> str:
    """The request's size, in words (for errors)."""
    longest = max((len(e.input_tokens) for e in request.examples), default=0)
    return f"a forward-backward of {len(request.examples)} sequences (the longest {longest} tokens)"


def check_request(request: FwdBwdRequest, vocab: int, context_length: int) -> None:
    """What makes a request unrunnable on this model, as a BadRequestError naming the field."""
    spec = get_loss_function(request.loss_fn)
    if not request.examples:
        raise BadRequestError("data: at least one example is needed")
    for i, example in enumerate(request.examples):
        keys = set(example.loss_inputs) - {"target_tokens"}
        if keys != set(spec.inputs):
            raise BadRequestError(
                f"data[{i}].loss_fn_inputs: {request.loss_fn} takes target_tokens and {list(spec.inputs)}, "
                f"got {sorted(example.loss_inputs)}"
            )
        if example.target_tokens.dim() == 2 and request.loss_fn != "cross_entropy":
            raise BadRequestError(f"data[{i}].loss_fn_inputs.target_tokens: (T, K) targets are for cross_entropy only")
        if example.length == 0:
            raise BadRequestError(f"data[{i}]: the model input is empty")
        if example.length > context_length:
            raise BadRequestError(
                f"data[{i}]: the sequence has {example.length + 1} tokens, longer than the model's "
                f"context window of {context_length}"
            )
        for key, tokens in (("model_input", example.input_tokens), ("target_tokens", example.target_tokens)):
            if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
                raise BadRequestError(f"data[{i}].{key}: token ids must lie in [0, {vocab})")
        for key, value in example.loss_inputs.items():
            if key != "target_tokens" and not bool(torch.isfinite(value).all()):
                raise BadRequestError(f"data[{i}].loss_fn_inputs.{key}: values must be finite")
    if request.reduction == "mean" and sum(float(ex.weights.sum()) for ex in request.examples) == 0:
        raise BadRequestError("data: every weight is zero, so there is no loss to average")


def fused_pass(
    model, head_VH: torch.Tensor | None, pad_id: int, device, requests: Sequence[FwdBwdRequest],
    params: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> list:
    """Run every request's rows in one pass; a result dict or an exception per request.
    ``head_VH``: the frozen output head's weight when logits are exactly hidden @ head.T
    (so only the needed positions go through it), else None (the model's own logits).
    ``params``: the trained adapters' parameters, by adapter id. Their gradients are computed
    into fresh buffers and added to ``.grad`` only at the very end: if the pass raises, every
    adapter's accumulated gradient is exactly what it was. An adapter whose every request
    failed or has a non-finite loss gets no gradient at all (not even zeros)."""
    rows = [(r, request.adapter_id, ex) for r, request in enumerate(requests) for ex in request.examples]
    started = time.perf_counter()
    B, T = len(rows), max(ex.length for _, _, ex in rows)
    K = max(_width(ex) for _, _, ex in rows)
    inputs_BT = torch.full((B, T), pad_id, dtype=torch.long)
    targets_BTK = torch.zeros((B, T, K), dtype=torch.long)
    mask_BT = torch.zeros((B, T), dtype=torch.bool)
    selected_BT = torch.zeros((B, T), dtype=torch.bool)  # positions whose logprob is needed
    for b, (r, _, ex) in enumerate(rows):  # right padding: causal attention never sees it
        n = ex.length
        inputs_BT[b, :n] = ex.input_tokens
        targets_BTK[b, :n, : _width(ex)] = ex.target_tokens.reshape(n, -1)
        mask_BT[b, :n] = True
        selected_BT[b, :n] = True if _needs_every_position(requests[r]) else _loss_positions(ex)
    inputs_BT, targets_BTK = inputs_BT.to(device), targets_BTK.to(device)
    mask_BT, selected_BT = mask_BT.to(device), selected_BT.to(device)

    wants_grad = any(q.backward and q.adapter_id for q in requests)
    # Packed where the model keeps sequences apart (backend/train/packing.py), else padded.
    # Either way the logprobs come back in the padded (B, T, K) layout the losses read.
    mode = packing_mode(model) if B > 1 else None
    layout = None
    if mode == "varlen":  # one row of the real tokens, attention cut per sequence
        layout = pack_one_row([ex.length for _, _, ex in rows], device)
    elif mode == "rows":
        layout = pack([ex.length for _, _, ex in rows], device)
        layout = layout if len(layout.bins) < B else None  # else packing saves nothing: pad as before
    if layout is not None:
        spans = [(rows[b][1] if b is not None else None, n) for b, n in layout.spans]
        routing = Routing.from_lengths(spans, device)
    else:
        routing = Routing.build([adapter for _, adapter, _ in rows], device, tokens_per_row=T)  # once per pass
    split = varlen.sequences(layout.sequences) if layout is not None and layout.sequences else nullcontext()
    with torch.set_grad_enabled(wants_grad), use_adapters(routing), split:
        if layout is not None:
            logprobs_BTK = _packed_target_logprobs(
                model, head_VH, inputs_BT, mask_BT, targets_BTK, selected_BT, layout, pad_id
            )
        else:
            positions_BT = torch.arange(T, device=device).expand(B, T)
            logprobs_BTK = _target_logprobs(model, head_VH, inputs_BT, mask_BT, positions_BT, targets_BTK, selected_BT)
        losses: list[torch.Tensor | Exception] = []
        start = 0
        for request in requests:
            end = start + len(request.examples)
            try:
                losses.append(_request_loss(request, logprobs_BTK[start:end], mask_BT[start:end]))
            except Exception as exc:  # noqa: BLE001 - a request's own loss failing is its failure alone
                if is_out_of_memory(exc):
                    raise  # the whole pass's memory: the caller retries request by request
                losses.append(exc)
            start = end
    values = [loss if isinstance(loss, Exception) else float(loss.detach()) for loss in losses]
    finite = [not isinstance(v, Exception) and math.isfinite(v) for v in values]
    trained = [(loss, q.adapter_id) for loss, q, ok in zip(losses, requests, finite, strict=True)
               if ok and q.backward and q.adapter_id]  # fmt: skip
    reached: list[torch.Tensor] = []
    grads: Sequence[torch.Tensor | None] = ()
    if trained:
        for adapter_id in dict.fromkeys(a for _, a in trained):
            if params is None or adapter_id not in params:
                raise ValueError(f"fused_pass: request trains {adapter_id!r}, but its parameters were not given")
            reached += params[adapter_id]
        # Requests are independent, so the sum's gradient on each adapter is its own loss's;
        # a request with a non-finite loss is left out and sends no gradient.
        grads = torch.autograd.grad(torch.stack([loss for loss, _ in trained]).sum(), reached, allow_unused=True)
    elapsed = time.perf_counter() - started

    results: list[dict | BaseException] = []
    logprobs_cpu = logprobs_BTK.detach().cpu() if any(q.return_logprobs for q in requests) else None
    start = 0
    for r, request in enumerate(requests):
        end, start = start + len(request.examples), start + len(request.examples)
        if isinstance(values[r], Exception):
            results.append(values[r])
            continue
        if not finite[r]:
            # The model's logprobs are finite, so the request's loss inputs overflowed: its error.
            results.append(BadRequestError(
                f"the loss is not finite ({values[r]}); no gradient was applied. The loss inputs "
                "(weights, advantages, logprobs, loss_fn_config) overflow float32: scale them down"
            ))
            continue
        result = {
            "loss": values[r],
            "num_tokens": sum(ex.length for ex in request.examples),
            "num_loss_tokens": sum(ex.num_loss_tokens for ex in request.examples),
            "num_sequences": len(request.examples),
            "batch_requests": len(requests),  # requests fused into this pass
            "batch_sequences": B,
            "elapsed_s": elapsed,
        }
        if logprobs_cpu is not None and request.return_logprobs:
            first = end - len(request.examples)
            result["logprobs"] = [
                _unpad(logprobs_cpu[first + i], ex) for i, ex in enumerate(request.examples)
            ]
        results.append(result)
    if grads:
        _accumulate(reached, grads)  # last: nothing after it can fail and leave it half done
    return results


@torch.no_grad()
def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``p.grad += g`` for each parameter the pass reached (as ``backward()`` would): one
    foreach add where there were gradients; where there were none, the fresh buffer itself,
    or, for an adapter kept in flat buffers (backend/lora/flat.py), a copy into its flat
    gradient, so that its optimizer step reads one tensor."""
    reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    adding = [(p.grad, g) for p, g in reached if p.grad is not None]
    if adding:
        torch._foreach_add_([acc for acc, _ in adding], [g for _, g in adding])
    fresh = [(p, g) for p, g in reached if p.grad is None]
    by_flat: dict[int, tuple] = {}
    for p, g in fresh:
        flat = flat_owner_of(p)
        if flat is None:
            p.grad = g
        else:
            by_flat.setdefault(id(flat), (flat, {}))[1][p] = g
    for flat, given in by_flat.values():
        flat.take_gradients([given.get(p) for p in flat.params])


def _width(example: Example) -> int:
    """K: how many target tokens each position has (1 for plain next-token targets)."""
    targets = example.target_tokens
    return 1 if targets.dim() == 1 else int(targets.shape[1])


def _needs_every_position(request: FwdBwdRequest) -> bool:
    # Tinker returns a logprob at every position; DRO's penalty applies at every position.
    return request.return_logprobs or request.loss_fn == "dro"


def _loss_positions(example: Example) -> torch.Tensor:
    """(T,) positions with a nonzero weight or advantage: the only ones that carry loss."""
    inputs, n = example.loss_inputs, example.length
    carried = torch.zeros(n, dtype=torch.bool)
    for key in ("weights", "advantages"):
        if key in inputs:
            carried |= (inputs[key].reshape(n, -1) != 0).any(dim=1)
    return carried


def _target_logprobs(model, head_VH, inputs_BT, mask_BT, positions_BT, targets_BTK, selected_BT) -> torch.Tensor:
    """log p(target) at every selected position, 0 elsewhere: -> (B, T, K) fp32."""
    attention_BT = mask_BT.long()
    if head_VH is None:
        logits_BTV = model(input_ids=inputs_BT, attention_mask=attention_BT, position_ids=positions_BT).logits
        logprobs_BTK = F.log_softmax(logits_BTV.float(), dim=-1).gather(2, targets_BTK)
        return logprobs_BTK * selected_BT.unsqueeze(2)
    # Only selected positions go through the output head (prompt tokens often don't).
    out = model.model(input_ids=inputs_BT, attention_mask=attention_BT, position_ids=positions_BT)
    hidden_BTH = out.last_hidden_state
    return _head_logprobs(hidden_BTH[selected_BT], head_VH, targets_BTK, selected_BT)


def _head_logprobs(hidden_SH, head_VH, targets_BTK, selected_BT) -> torch.Tensor:
    """log p(targets) at the selected positions from their hidden states (S, H), scattered
    into the (B, T, K) layout (zeros elsewhere)."""
    B, T, K = targets_BTK.shape
    targets_SK = targets_BTK[selected_BT]
    if K == 1:
        logprobs_SK = head_target_logprobs(hidden_SH, head_VH, targets_SK[:, 0]).unsqueeze(1)
    else:  # top-K targets: the full log-softmax at the selected positions
        logprobs_SK = F.log_softmax((hidden_SH @ head_VH.t()).float(), dim=-1).gather(1, targets_SK)
    where_BTK = selected_BT.unsqueeze(2).expand(B, T, K)
    return torch.zeros((B, T, K), dtype=torch.float32, device=hidden_SH.device).masked_scatter(where_BTK, logprobs_SK)


def _packed_target_logprobs(
    model, head_VH, inputs_BT, mask_BT, targets_BTK, selected_BT, layout: PackedLayout, pad_id: int
) -> torch.Tensor:
    """``_target_logprobs`` with the rows' real tokens packed (backend/train/packing.py),
    scattered back into the padded (B, T, K) layout."""
    B, T, K = targets_BTK.shape
    P, L = layout.positions_PL.shape
    inputs_PL = torch.full((P * L,), pad_id, dtype=torch.long, device=inputs_BT.device)
    inputs_PL[layout.flat_N] = inputs_BT[mask_BT]  # row-major: each sequence's real tokens in its place
    # No attention mask and no cache: transformers then reads the sequence boundaries
    # from the position ids and keeps each sequence's attention to itself.
    kwargs = {"input_ids": inputs_PL.view(P, L), "position_ids": layout.positions_PL, "use_cache": False}
    if head_VH is None:
        logits_NV = model(**kwargs).logits.reshape(P * L, -1)[layout.flat_N]
        targets_NK = targets_BTK[mask_BT]
        logprobs_NK = F.log_softmax(logits_NV.float(), dim=-1).gather(1, targets_NK)
        where_BTK = mask_BT.unsqueeze(2).expand(B, T, K)
        logprobs_BTK = torch.zeros((B, T, K), dtype=torch.float32, device=logits_NV.device)
        return logprobs_BTK.masked_scatter(where_BTK, logprobs_NK) * selected_BT.unsqueeze(2)
    hidden_PLH = model.model(**kwargs).last_hidden_state
    chosen_S = layout.flat_N[selected_BT[mask_BT]]  # selected positions are real ones, in the same order
    return _head_logprobs(hidden_PLH.reshape(P * L, -1)[chosen_S], head_VH, targets_BTK, selected_BT)


def _request_loss(request: FwdBwdRequest, logprobs_nTK: torch.Tensor, mask_nT: torch.Tensor) -> torch.Tensor:
    """The request's scalar loss from its rows' logprobs (n, T, K)."""
    n, T, K = logprobs_nTK.shape
    width = max(_width(ex) for ex in request.examples)
    two_d = any(ex.target_tokens.dim() == 2 for ex in request.examples)
    inputs: dict[str, torch.Tensor] = {}
    for key in request.examples[0].loss_inputs:
        if key == "target_tokens":
            continue
        per_target = two_d and key == "weights"  # (T, K) like the targets, else (T,)
        padded = torch.zeros((n, T, width) if per_target else (n, T), dtype=torch.float32)
        for i, ex in enumerate(request.examples):
            value = ex.loss_inputs[key]
            padded[i, : ex.length] = value.reshape(ex.length, -1) if per_target else value
        inputs[key] = padded.to(logprobs_nTK.device)
    logprobs = logprobs_nTK[:, :, :width] if two_d else logprobs_nTK[:, :, 0]
    if two_d:  # only cross_entropy takes (T, K) targets: weights is its only input
        inputs = {key: value if key == "weights" else value.unsqueeze(2) for key, value in inputs.items()}
    elementwise = LOSS_FUNCTIONS[request.loss_fn].elementwise(logprobs, inputs, request.loss_config)
    mask = mask_nT.unsqueeze(2) if two_d else mask_nT
    total = (elementwise * mask).sum()
    if request.reduction == "mean":
        return total / inputs["weights"].sum()
    return total


def _unpad(logprobs_TK: torch.Tensor, example: Example) -> torch.Tensor:
    """One example's logprobs, shaped like its target_tokens."""
    cut = logprobs_TK[: example.length, : _width(example)]
    return cut if example.target_tokens.dim() == 2 else cut[:, 0]
