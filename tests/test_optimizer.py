"""The fused AdamW over many adapters, gradient accumulation without clones, retries only for
out of memory, and optimizer state in checkpoints and residency (backend/lora/optimizer.py,
backend/train/fused_pass.py, HFBackend.forward_backward / optim_steps)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from backend import AdamParams, FwdBwdRequest
from backend.lora.residency import _move
from backend.train import fused_pass as fused_pass_module

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi Alice!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, or green."}],
]


@pytest.fixture
def adapters(backend) -> Iterator[list[str]]:
    """Three fresh trainable adapters (rank 4 on every linear layer), removed afterwards."""
    ids = [backend.add_lora(4, 8.0, None, 500 + i)["model_id"] for i in range(3)]
    yield ids
    for adapter_id in ids:
        backend.remove_adapter(adapter_id)


def _params(backend, adapter_id: str) -> list[torch.nn.Parameter]:
    return backend.adapters.get(adapter_id).params


def _set_grads(params, generator: torch.Generator) -> list[torch.Tensor]:
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


def _requests(backend, ids: list[str], **kwargs) -> list[FwdBwdRequest]:
    pairs = zip(ids, CONVERSATIONS[: len(ids)], strict=True)
    return [FwdBwdRequest(a, backend.render_conversations([c]), **kwargs) for a, c in pairs]


def _grads(backend, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in _params(backend, adapter_id)]


def _zero(backend, ids: list[str]) -> None:
    for adapter_id in ids:
        backend.adapters.get(adapter_id).optimizer.zero_grad(set_to_none=True)


# ---- the fused step --------------------------------------------------------------------------


def test_one_fused_step_equals_each_adapters_own_adamw(backend, adapters, monkeypatch):
    """Different learning rates, weight decays, clipping and step counts; several steps."""
    hyper = [
        AdamParams(learning_rate=1e-2),
        AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, grad_clip_norm=0.5),
        AdamParams(learning_rate=1e-2),  # same as the first: they share a launch
    ]
    reference = [[p.detach().clone().requires_grad_() for p in _params(backend, a)] for a in adapters]
    optimizers = [
        torch.optim.AdamW(ref, lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)
        for ref, h in zip(reference, hyper, strict=True)
    ]
    launches = []
    real_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: launches.append(len(a[0])) or real_kernel(*a, **k))
    generator = torch.Generator().manual_seed(0)
    for round_ in range(4):
        # The first adapter starts two steps ahead: its bias correction differs from the others'.
        stepping = [0] if round_ < 2 else [0, 1, 2]
        expected_norms = []
        for k in stepping:
            grads = _set_grads(_params(backend, adapters[k]), generator)
            for p, g in zip(reference[k], grads, strict=True):
                p.grad = g.clone()
            norm = torch.nn.utils.clip_grad_norm_(reference[k], hyper[k].grad_clip_norm or float("inf"))
            expected_norms.append(float(norm))
            optimizers[k].step()
        launches.clear()
        outcomes = backend.optim_steps([(adapters[k], hyper[k]) for k in stepping])
        assert len(launches) == (1 if round_ < 2 else 2)  # one launch per set of hyperparameters
        for k, outcome, norm in zip(stepping, outcomes, expected_norms, strict=True):
            assert outcome["grad_norm"] == pytest.approx(norm, rel=1e-6)
            assert outcome["step"] == backend.adapters.get(adapters[k]).step
    for k, adapter_id in enumerate(adapters):
        for p, ref in zip(_params(backend, adapter_id), reference[k], strict=True):
            assert p.grad is None
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-7)
    assert [backend.adapters.get(a).step for a in adapters] == [4, 2, 2]


def test_an_adapter_named_twice_steps_twice_in_order(backend, adapters):
    """The second step of a batch comes after the first, whose gradients it no longer sees."""
    adapter = backend.adapters.get(adapters[0])
    reference = [p.detach().clone().requires_grad_() for p in adapter.params]
    optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    grads = _set_grads(adapter.params, torch.Generator().manual_seed(1))
    for p, g in zip(reference, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()
    outcomes = backend.optim_steps([(adapters[0], AdamParams(learning_rate=1e-2))] * 2)
    assert [o["step"] for o in outcomes] == [1, 2]
    assert all(float(s["step"]) == 1 for s in adapter.optimizer.state.values())  # no gradient, no AdamW step
    torch.testing.assert_close([p.detach() for p in adapter.params], [p.detach() for p in reference], rtol=0, atol=1e-7)


def test_a_non_finite_gradient_refuses_its_step_and_no_other(backend, adapters):
    generator = torch.Generator().manual_seed(2)
    for adapter_id in adapters[:2]:
        _set_grads(_params(backend, adapter_id), generator)
    _params(backend, adapters[1])[0].grad[0, 0] = float("inf")
    before = [[p.detach().clone() for p in _params(backend, a)] for a in adapters[:2]]
    outcomes = backend.optim_steps([(a, AdamParams()) for a in adapters[:2]] + [("no-such-adapter", AdamParams())])
    assert outcomes[0]["step"] == 1
    assert "not finite" in str(outcomes[1]) and "no-such-adapter" in str(outcomes[2])
    assert not torch.equal(before[0][0], _params(backend, adapters[0])[0].detach())
    for p, old in zip(_params(backend, adapters[1]), before[1], strict=True):
        assert p.grad is None and torch.equal(p.detach(), old)


# ---- gradients: accumulated only when a pass succeeds ----------------------------------------


@contextmanager
def failing_backward(fail_for: int) -> Iterator[None]:
    """Request ``fail_for``'s loss raises in the middle of the backward pass."""

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("a kernel failed in the backward pass")

    real = fused_pass_module._request_loss
    calls = []

    def request_loss(request, *args):
        calls.append(request)
        loss = real(request, *args)
        return Boom.apply(loss) if len(calls) - 1 == fail_for else loss

    fused_pass_module._request_loss = request_loss
    try:
        yield
    finally:
        fused_pass_module._request_loss = real


@pytest.mark.parametrize("where", ["in-backward", "after-backward"])
def test_a_failing_pass_leaves_accumulated_gradients_exactly_as_they_were(backend, adapters, monkeypatch, where):
    first = backend.forward_backward(_requests(backend, adapters[:2]))  # the third has no gradient yet
    assert all(isinstance(o, dict) for o in first)
    before = {a: _grads(backend, a) for a in adapters}
    requests = _requests(backend, adapters, return_logprobs=True)
    if where == "in-backward":
        with failing_backward(fail_for=1):
            outcomes = backend.forward_backward(requests)
    else:  # the gradients exist, the results are being written: it must still add nothing
        monkeypatch.setattr(fused_pass_module, "_unpad", lambda *a: (_ for _ in ()).throw(RuntimeError("late")))
        outcomes = backend.forward_backward(requests)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    for adapter_id in adapters:
        for now, then in zip(_grads(backend, adapter_id), before[adapter_id], strict=True):
            assert (now is None and then is None) or torch.equal(now, then)
    _zero(backend, adapters)


def test_a_pass_adds_to_the_gradient_as_backward_would(backend, adapters):
    """Two passes accumulate to the sum of each alone (the fresh buffers are added once)."""
    requests = _requests(backend, adapters[:2])
    singles = []
    for request in requests:
        backend.forward_backward([request])
        singles.append(_grads(backend, request.adapter_id))
        _zero(backend, [request.adapter_id])
    backend.forward_backward(requests)
    backend.forward_backward(requests)
    for request, alone in zip(requests, singles, strict=True):
        for now, one in zip(_grads(backend, request.adapter_id), alone, strict=True):
            torch.testing.assert_close(now, 2 * one, rtol=1e-5, atol=1e-7)
    _zero(backend, adapters)


# ---- retries: only for out of memory -----------------------------------------------------------


@contextmanager
def counting_forwards(backend, error_for_batches: BaseException | None) -> Iterator[list[int]]:
    """Count the decoder's forward passes (their batch sizes); raise ``error_for_batches`` in
    every forward of more than one row. Passes are padded (not packed into one row) so that
    rows count sequences."""
    inner = backend.model.model
    real_mode = fused_pass_module.packing_mode
    fused_pass_module.packing_mode = lambda model: None
    seen: list[int] = []

    def forward(*args, **kwargs):
        ids_BT = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append(int(ids_BT.shape[0]))
        if error_for_batches is not None and ids_BT.shape[0] > 1:
            raise error_for_batches
        return type(inner).forward(inner, *args, **kwargs)

    inner.forward = forward
    try:
        yield seen
    finally:
        del inner.forward
        fused_pass_module.packing_mode = real_mode


def test_a_fused_pass_failing_for_another_reason_is_not_retried(backend, adapters):
    before = {a: _grads(backend, a) for a in adapters}
    with counting_forwards(backend, RuntimeError("a kernel failed")) as seen:
        outcomes = backend.forward_backward(_requests(backend, adapters))
    assert seen == [3]  # one pass, no reruns
    assert all(isinstance(o, RuntimeError) and "a kernel failed" in str(o) for o in outcomes)
    assert {a: _grads(backend, a) for a in adapters} == before  # all None


def test_a_fused_pass_out_of_memory_is_retried_request_by_request(backend, adapters):
    with counting_forwards(backend, torch.OutOfMemoryError("CUDA out of memory")) as seen:
        outcomes = backend.forward_backward(_requests(backend, adapters))
    assert seen == [3, 1, 1, 1]
    assert all(isinstance(o, dict) for o in outcomes)
    _zero(backend, adapters)


def test_a_request_whose_own_loss_fails_fails_alone_without_a_rerun(backend, adapters, monkeypatch):
    requests = _requests(backend, adapters)
    alone = []
    for request in requests:
        backend.forward_backward([request])
        alone.append(_grads(backend, request.adapter_id))
        _zero(backend, [request.adapter_id])
    real = fused_pass_module._request_loss

    def request_loss(request, *args):
        if request.adapter_id == adapters[1]:
            raise ValueError("this request's loss inputs are malformed")
        return real(request, *args)

    monkeypatch.setattr(fused_pass_module, "_request_loss", request_loss)
    with counting_forwards(backend, None) as seen:
        outcomes = backend.forward_backward(requests)
    assert seen == [3]
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[0], dict) and isinstance(outcomes[2], dict)
    assert all(g is None for g in _grads(backend, adapters[1]))
    for k in (0, 2):
        for now, one in zip(_grads(backend, adapters[k]), alone[k], strict=True):
            torch.testing.assert_close(now, one, rtol=1e-5, atol=1e-6)
    _zero(backend, adapters)


# ---- checkpoints and residency ----------------------------------------------------------------


def _train_steps(backend, adapter_id: str, steps: int, lr: float) -> None:
    for _ in range(steps):
        backend.forward_backward([FwdBwdRequest(adapter_id, backend.render_conversations(CONVERSATIONS[:1]))])
        backend.optim_step(adapter_id, AdamParams(learning_rate=lr))


def test_optimizer_state_round_trips_through_a_checkpoint(backend, adapters, tmp_path):
    _train_steps(backend, adapters[0], 2, lr=1e-2)
    backend.save_state(adapters[0], tmp_path / "ckpt", True)
    saved = torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"state", "param_groups"}  # torch's optimizer state_dict, as before
    assert saved["param_groups"][0]["lr"] == 1e-2
    assert len(saved["state"]) == len(_params(backend, adapters[0]))
    assert all(float(s["step"]) == 2 for s in saved["state"].values())

    copy_id = backend.create_from_checkpoint(tmp_path / "ckpt", None, optimizer=True, trainable=True)["model_id"]
    try:
        _train_steps(backend, adapters[0], 1, lr=1e-2)
        _train_steps(backend, copy_id, 1, lr=1e-2)
        for mine, theirs in zip(_params(backend, copy_id), _params(backend, adapters[0]), strict=True):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=0, atol=1e-7)
    finally:
        backend.remove_adapter(copy_id)


def test_a_checkpoint_written_by_a_plain_torch_adamw_loads_and_continues(backend, adapters, tmp_path):
    """The old code saved each adapter's torch AdamW state_dict; such a file (here from an
    unfused AdamW, its step counters on the CPU) loads, and the next step continues it."""
    adapter = backend.adapters.get(adapters[0])
    reference = [p.detach().clone().requires_grad_() for p in adapter.params]
    optimizer = torch.optim.AdamW(reference, lr=5e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in reference:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    with torch.no_grad():
        for p, ref in zip(adapter.params, reference, strict=True):
            p.copy_(ref)
    backend.save_state(adapters[0], tmp_path / "old", False)
    torch.save(optimizer.state_dict(), tmp_path / "old" / "optimizer.pt")

    loaded_id = backend.create_from_checkpoint(tmp_path / "old", None, optimizer=True, trainable=True)["model_id"]
    try:
        grads = _set_grads(_params(backend, loaded_id), generator)
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        outcome = backend.optim_step(loaded_id, AdamParams(learning_rate=5e-3, weight_decay=0.01))
        assert outcome["step"] == 1  # the server's own counter; AdamW's (4) is in the state
        state = backend.adapters.get(loaded_id).optimizer.state
        assert all(float(s["step"]) == 4 for s in state.values())
        for p, ref in zip(_params(backend, loaded_id), reference, strict=True):
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-7)
    finally:
        backend.remove_adapter(loaded_id)


def test_residency_moves_the_optimizer_state_with_the_adapter(backend, adapters, monkeypatch):
    """Offloading moves weights, gradients and every AdamW state tensor (the step counters too:
    the fused kernel wants them beside the weights). On a CPU-only machine both places are the
    same memory, so what is checked is that each tensor is handed to ``.to(device)``."""
    _train_steps(backend, adapters[0], 1, lr=1e-3)
    adapter = backend.adapters.get(adapters[0])
    _set_grads(adapter.params, torch.Generator().manual_seed(4))
    state = [v for s in adapter.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert len(state) == 3 * len(adapter.params)  # step, exp_avg, exp_avg_sq each
    moved: list[torch.Tensor] = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        moved.append(self)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    _move(adapter, torch.device("cpu"))
    monkeypatch.undo()
    # Views into the adapter's flat buffers move with their buffer (one .to each).
    moved_storage = {t.untyped_storage().data_ptr() for t in moved}
    expected = [*adapter.params, *(p.grad for p in adapter.params), *state]
    assert all(t.untyped_storage().data_ptr() in moved_storage for t in expected)
    assert len(moved) < len(expected)  # not tensor by tensor: the weights and moments as buffers


# ---- flat buffers: one tensor per adapter -------------------------------------------------------


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_weights_gradients_and_moments_are_views_into_flat_buffers(backend, adapters):
    adapter = backend.adapters.get(adapters[0])
    flat = adapter.flat
    assert all(_storage(p) == _storage(flat.weights_P) for p in adapter.params)
    backend.forward_backward(_requests(backend, adapters[:1]))  # a pass's gradients land in the buffer
    assert all(_storage(p.grad) == _storage(flat.grads_P) for p in adapter.params)
    backend.optim_step(adapters[0], AdamParams(learning_rate=1e-2))
    for p in adapter.params:
        state = adapter.optimizer.state[p]
        assert _storage(state["exp_avg"]) == _storage(flat.exp_avg_P)
        assert _storage(state["exp_avg_sq"]) == _storage(flat.exp_avg_sq_P)
        assert _storage(state["step"]) == _storage(flat.steps_S) and float(state["step"]) == 1
    # The layers compute with the very same storage the optimizer just updated.
    layer = backend.model.get_submodule(adapter.layer_names[0])
    assert _storage(layer.lora_A[adapter.id]) == _storage(flat.weights_P)


def test_a_step_with_some_gradients_missing_equals_torch_adamw(backend, adapters):
    """Parameters without a gradient are left alone (torch's rule), so that step and the
    ones after it (counters no longer equal) go tensor by tensor; results stay torch's."""
    adapter = backend.adapters.get(adapters[0])
    reference = [p.detach().clone().requires_grad_() for p in adapter.params]
    optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.05)
    generator = torch.Generator().manual_seed(5)
    for round_ in range(3):
        grads = _set_grads(adapter.params, generator)
        for i, (p, ref, g) in enumerate(zip(adapter.params, reference, grads, strict=True)):
            keep = round_ != 1 or i % 2 == 0  # round 1: every other parameter has no gradient
            ref.grad = g.clone() if keep else None
            if not keep:
                p.grad = None
        optimizer.step()
        backend.optim_step(adapters[0], AdamParams(learning_rate=1e-2, weight_decay=0.05))
    for p, ref in zip(adapter.params, reference, strict=True):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-7)
    steps = [int(adapter.optimizer.state[p]["step"]) for p in adapter.params]
    assert steps[:2] == [3, 2]


def _top_level_ops(backend, fn) -> int:
    """How many aten ops ``fn`` dispatches (a foreach op over N tensors counts once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    def counted():
        with Count():
            fn()
        return Count.ops

    return backend.compute.run(counted)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_a_step_of_many_adapters_dispatches_as_many_ops_as_one(backend, clip):
    ids = [backend.add_lora(4, 8.0, None, 700 + i)["model_id"] for i in range(6)]
    try:
        adam = AdamParams(learning_rate=1e-3, grad_clip_norm=clip)
        conversation = backend.render_conversations(CONVERSATIONS[:1])
        requests = [FwdBwdRequest(a, conversation) for a in ids]
        backend.forward_backward(requests)
        backend.optim_steps([(a, adam) for a in ids])  # first step: the moments are made
        counts = {}
        for n in (1, len(ids)):
            backend.forward_backward(requests[:n])
            counts[n] = _top_level_ops(backend, lambda n=n: backend.optim_steps([(a, adam) for a in ids[:n]]))
        tensors = len(backend.adapters.get(ids[0]).params)
        assert counts[1] == counts[len(ids)] < tensors  # not one per tensor, nor per adapter
    finally:
        for adapter_id in ids:
            backend.remove_adapter(adapter_id)
