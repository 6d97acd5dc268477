"""KL estimators by exact expectation over small categorical distributions; KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from fastllm.rl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3


def _random_pair(K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(K, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(2.0 * torch.randn(K, generator=gen, dtype=torch.float64), 0)
    return p, q


@pytest.mark.parametrize("K,seed", [(2, 0), (3, 1), (7, 2), (16, 3)])
def test_expectations_under_the_sampling_policy(K, seed):
    """Enumerate y: E_{y~p}[k(log p(y), log q(y))] = sum_y p(y) k(...), no sampling."""
    p, q = _random_pair(K, seed)
    logp, logq = p.log(), q.log()
    kl = kl_divergence(Categorical(probs=p), Categorical(probs=q)).item()  # independent reference
    assert kl > 1e-3
    e1 = (p * kl_k1(logp, logq)).sum().item()
    e3 = (p * kl_k3(logp, logq)).sum().item()
    e2 = (p * kl_k2(logp, logq)).sum().item()
    assert e1 == pytest.approx(kl, rel=1e-10)
    assert e3 == pytest.approx(kl, rel=1e-10)
    # k2's expectation: sum_y p(y) (log p(y) - log q(y))^2 / 2, written out per category
    closed = sum(p[i].item() * (math.log(p[i].item()) - math.log(q[i].item())) ** 2 / 2 for i in range(K))
    assert e2 == pytest.approx(closed, rel=1e-10)
    # k3 and k2 are non-negative for every sample; k1 is not (unless p == q)
    assert (kl_k3(logp, logq) >= 0).all() and (kl_k2(logp, logq) >= 0).all()
    assert (kl_k1(logp, logq) < 0).any()
    # the dispatcher names the same functions
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(logp, logq, kind), fn(logp, logq))


def test_k3_keeps_precision_when_policies_agree():
    logp = torch.full((4,), -2.0, dtype=torch.float32)
    d = torch.tensor([1e-3, -1e-4, 3e-5, 0.0])
    ref = logp + d
    got = kl_k3(logp, ref)
    exact = torch.expm1(d.double()) - d.double()  # ~ d^2 / 2
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-14)


def test_kl_estimate_errors():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 4))


def test_adaptive_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9 > target: error 9/6 - 1 = 0.5 clipped to 0.2; beta = 0.2 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.2 * 1.00512, rel=1e-14)
    # KL 5.7: error -0.05; beta *= 1 - 0.05 * 512 / 10000
    expected = 0.2 * 1.00512 * (1 - 0.05 * 512 / 10000)
    assert ctl.update(torch.tensor(5.7, dtype=torch.float64), 512) == pytest.approx(expected, rel=1e-12)
    # KL 0: error -1 clipped to -0.2
    before = ctl.value
    assert ctl.update(0.0, 100) == pytest.approx(before * (1 - 0.2 * 100 / 10000), rel=1e-14)

    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.update(7.0, 10) == ctl.update(7.0, 10)
    with pytest.raises(KeyError, match="value"):
        other.load_state_dict({"value": 1.0})
    with pytest.raises(FloatingPointError, match="current_kl"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)


def test_fixed_controller_has_the_same_interface():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
