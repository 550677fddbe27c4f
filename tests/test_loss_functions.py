"""Tinker's built-in losses against values and gradients worked out by hand on small tensors,
and through the fused pass against the same formulas applied to its own logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from backend import FwdBwdRequest
from backend.train.examples import Example
from backend.train.losses import LOSS_FUNCTIONS, loss_config
from thinker.core.errors import BadRequestError

pytestmark = pytest.mark.unit

LP = [-1.0, -2.0, -0.5]  # the learner's logprobs ℓ
Q = [-1.2, -1.5, -0.5]  # the sampler's logprobs q
A = [1.0, -0.5, 2.0]  # advantages
W = [1.0, 0.0, 2.0]  # weights


def loss_and_grad(name: str, config: dict | None = None) -> tuple[float, list[float]]:
    lp = torch.tensor(LP, dtype=torch.float64, requires_grad=True)
    inputs = {"weights": torch.tensor(W, dtype=torch.float64), "logprobs": torch.tensor(Q, dtype=torch.float64)}
    inputs["advantages"] = torch.tensor(A, dtype=torch.float64)
    loss = LOSS_FUNCTIONS[name].elementwise(lp, inputs, loss_config(name, config)).sum()
    loss.backward()
    return float(loss.detach()), lp.grad.tolist()


def ratios() -> list[float]:
    return [math.exp(lp - q) for lp, q in zip(LP, Q, strict=True)]


def test_cross_entropy():
    loss, grad = loss_and_grad("cross_entropy")
    assert loss == pytest.approx(1.0 * 1.0 + 0.0 * 2.0 + 2.0 * 0.5)  # -Σ w·ℓ = 2.0
    assert grad == pytest.approx([-1.0, 0.0, -2.0])  # -w


def test_importance_sampling():
    r = ratios()  # e^0.2, e^-0.5, e^0
    loss, grad = loss_and_grad("importance_sampling")
    assert loss == pytest.approx(-(r[0] * 1.0 + r[1] * -0.5 + r[2] * 2.0))
    assert grad == pytest.approx([-r[0] * 1.0, -r[1] * -0.5, -r[2] * 2.0])  # -r·A: the ratio is not detached


def test_ppo_clips_where_the_ratio_leaves_the_band():
    r = ratios()  # 1.221 (A>0: clipped at 1.1), 0.607 (A<0: clipped at 0.9), 1.0 (inside)
    loss, grad = loss_and_grad("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    assert loss == pytest.approx(-(1.1 * 1.0 + 0.9 * -0.5 + 1.0 * 2.0))
    assert grad == pytest.approx([0.0, 0.0, -r[2] * 2.0])  # clipped tokens send no gradient
    default_loss, _ = loss_and_grad("ppo")  # defaults 0.8 / 1.2
    assert default_loss == pytest.approx(-(1.2 * 1.0 + 0.8 * -0.5 + 1.0 * 2.0))


def test_cispo_weights_the_logprob_by_the_clipped_ratio():
    r = ratios()
    loss, grad = loss_and_grad("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    clipped = [min(max(x, 0.8), 1.2) for x in r]  # 1.2, 0.8, 1.0
    assert loss == pytest.approx(-sum(c * lp * a for c, lp, a in zip(clipped, LP, A, strict=True)))
    assert grad == pytest.approx([-c * a for c, a in zip(clipped, A, strict=True)])  # the coefficient is detached


def test_dro_penalises_the_distance_from_the_sampler():
    beta = 0.1
    loss, grad = loss_and_grad("dro", {"beta": beta})
    expected = -sum(lp * a - 0.5 * beta * (lp - q) ** 2 for lp, q, a in zip(LP, Q, A, strict=True))
    assert loss == pytest.approx(expected)
    assert grad == pytest.approx([-a + beta * (lp - q) for lp, q, a in zip(LP, Q, A, strict=True)])


def test_gspo_gives_every_token_the_sequence_ratio_and_its_own_gradient():
    """Two rows (two datums): each row's ratio is the geometric mean of its masked tokens'."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[-1.2, -1.5, -0.5], [-0.3, -0.5, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    inputs = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": mask}
    config = loss_config("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05})
    loss = LOSS_FUNCTIONS["gspo"].elementwise(lp, inputs, config).sum()
    loss.backward()
    # Row 0: mean log-ratio over tokens 1, 2 = (-0.5 + 0) / 2; s = e^-0.25 = 0.7788, below the
    # band; A > 0 so min(s·A, 0.9·A) = s·A: unclipped, each token's gradient is -s·A.
    s0 = math.exp(-0.25)
    # Row 1: mean log-ratio = (0 - 0.2 - 0.1) / 3 = -0.1; s = 0.9048, inside the band: unclipped.
    s1 = math.exp(-0.1)
    expected = -(s0 * 1.0 + s0 * 1.0) - 3 * s1 * -2.0
    assert loss.item() == pytest.approx(expected)
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, -s0, -s0, 2 * s1, 2 * s1, 2 * s1])
    # Now clip row 1 (band [0.95, 1.05]): A < 0 so min(s·A, 0.95·A) = 0.95·A, no gradient.
    lp.grad = None
    config = loss_config("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05})
    loss = LOSS_FUNCTIONS["gspo"].elementwise(lp, inputs, config).sum()
    loss.backward()
    assert loss.item() == pytest.approx(-(2 * s0) - 3 * 0.95 * -2.0)
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, -s0, -s0, 0.0, 0.0, 0.0])


def test_stable_reinforce_truncates_the_detached_weight_at_one():
    lp = torch.tensor(LP, dtype=torch.float64, requires_grad=True)
    mask = [1.0, 1.0, 0.0]  # the last position names no sampled token: it carries nothing
    inputs = {
        "logprobs": torch.tensor(Q, dtype=torch.float64),
        "advantages": torch.tensor(A, dtype=torch.float64),
        "stability_mask": torch.tensor(mask, dtype=torch.float64),
    }
    kl = 0.5
    loss = LOSS_FUNCTIONS["stable_reinforce"].elementwise(lp, inputs, loss_config("stable_reinforce", {"kl_coeff": kl}))
    loss.sum().backward()
    r = ratios()  # e^0.2 (truncated to 1), e^-0.5 = 0.607, e^0
    w = [min(x, 1.0) for x in r]
    expected = [
        m * (-wi * lp_ * a + 0.5 * kl * (lp_ - q) ** 2) for m, wi, lp_, q, a in zip(mask, w, LP, Q, A, strict=True)
    ]
    assert loss.tolist() == pytest.approx(expected)
    assert lp.grad.tolist() == pytest.approx(
        [m * (-wi * a + kl * (lp_ - q)) for m, wi, lp_, q, a in zip(mask, w, LP, Q, A, strict=True)]
    )
    # Without kl_coeff (its default 0), on policy it is plain REINFORCE: -A·∇ℓ.
    assert loss_config("stable_reinforce", None) == {"kl_coeff": 0.0}


def test_config_rejects_unknown_keys_and_non_numbers():
    with pytest.raises(BadRequestError, match="loss_fn_config.beta"):
        loss_config("ppo", {"beta": 0.1})
    with pytest.raises(BadRequestError, match="must be a number"):
        loss_config("dro", {"beta": "high"})
    with pytest.raises(BadRequestError, match="not supported"):
        loss_config("reinforce++", None)


def _rl_example(tokens: list[int], q: list[float], adv: list[float]) -> Example:
    return Example(tokens[:-1], {"target_tokens": tokens[1:], "logprobs": q, "advantages": adv})


def test_fused_pass_sums_each_loss_on_its_own_rows(backend):
    """Requests with different losses fused in one pass: each one's loss:sum is its formula
    applied to the logprobs the pass returns, and equals running it alone."""
    adapters = [backend.add_lora(4, 8.0, None, seed)["model_id"] for seed in (1, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    toks = [torch.randint(3, 200, (9,), generator=gen).tolist() for _ in range(3)]
    q = [-2.0] * 8
    adv = [0.0, 0.0, 1.0, -1.0, 0.5, 0.5, 2.0, -0.25]
    requests = [
        FwdBwdRequest(adapters[0], [_rl_example(toks[0], q, adv)], "ppo", loss_config("ppo", None), "sum",
                      return_logprobs=True),
        FwdBwdRequest(adapters[1], [_rl_example(toks[1], q, adv)], "dro", loss_config("dro", {"beta": 0.2}), "sum",
                      return_logprobs=True),
        FwdBwdRequest(adapters[2], [Example(toks[2][:-1], {"target_tokens": toks[2][1:], "weights": [1.0] * 8})],
                      "cross_entropy", {}, "sum", backward=False, return_logprobs=True),
    ]
    fused = backend.forward_backward(requests)
    alone = [backend.forward_backward([r])[0] for r in requests]
    for f, a in zip(fused, alone, strict=True):
        assert f["loss"] == pytest.approx(a["loss"], abs=1e-5)
    lp = fused[0]["logprobs"][0].double()
    r = torch.exp(lp - torch.tensor(q, dtype=torch.float64))
    at = torch.tensor(adv, dtype=torch.float64)
    assert fused[0]["loss"] == pytest.approx(float(-torch.minimum(r * at, r.clamp(0.8, 1.2) * at).sum()), abs=1e-5)
    lp = fused[1]["logprobs"][0].double()
    dro = -(lp * at - 0.1 * (lp + 2.0) ** 2).sum()
    assert fused[1]["loss"] == pytest.approx(float(dro), abs=1e-5)
    assert fused[2]["loss"] == pytest.approx(float(-fused[2]["logprobs"][0].sum()), abs=1e-5)
    for adapter_id in adapters:
        backend.adapters.remove(adapter_id)


def test_top_k_cross_entropy(backend):
    """(T, K) targets: every position scores K tokens, each with its own weight."""
    adapter = backend.add_lora(4, 8.0, None, 5)["model_id"]
    tokens = [5, 9, 14, 20, 33]
    targets = [[9, 10], [14, 15], [20, 21], [33, 34]]
    weights = [[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
    example = Example(tokens[:-1], {"target_tokens": targets, "weights": weights})
    request = FwdBwdRequest(adapter, [example], "cross_entropy", {}, "sum", backward=False, return_logprobs=True)
    result = backend.forward_backward([request])[0]
    logprobs = result["logprobs"][0]
    assert logprobs.shape == (4, 2)
    single = Example(tokens[:-1], {"target_tokens": [t[0] for t in targets], "weights": [1.0] * 4})
    plain = backend.forward_backward([FwdBwdRequest(adapter, [single], "cross_entropy", {}, "sum", False, True)])[0]
    torch.testing.assert_close(logprobs[:, 0], plain["logprobs"][0])
    assert result["loss"] == pytest.approx(float(-(logprobs * torch.tensor(weights)).sum()), abs=1e-5)
    backend.adapters.remove(adapter)
