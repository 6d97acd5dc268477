"""Convergence of PPO, DPO/IPO and GRPO on a K-armed bandit with a closed-form optimum.

One prompt, K actions ("responses" of one token), reward r (K,), a non-uniform reference
pi_ref (K,), a tabular policy pi = softmax(theta) started at pi_ref. The KL-regularised RLHF
objective

    J(pi) = E_{a~pi}[r_a] - beta KL(pi || pi_ref)

is strictly concave in pi on the simplex; its stationarity condition with a multiplier for
sum(pi) = 1, r_a - beta (log(pi_a / pi_ref_a) + 1) = lambda, gives the unique optimum

    pi*_a = pi_ref_a exp(r_a / beta) / Z.

- PPO with the k1 penalty in the reward: the per-sample reward r_a - beta (log pi_a - log
  pi_ref_a) with the score-function gradient is an unbiased gradient of J (E[grad k1] = 0),
  so the fixed point of PPO's clipped updates is pi*.
- DPO: with Bradley-Terry preferences p(i > j) = sigmoid(r_i - r_j) over pairs drawn from
  pi_ref, the expected DPO loss is a logistic regression of the label on beta h_ij,
  h_ij = log(pi_i / pi_ref_i) - log(pi_j / pi_ref_j), minimised where beta h_ij = r_i - r_j
  for every pair, i.e. pi = pi*. IPO's population optimum (Azar et al. 2023, Proposition 4
  with mu = pi_ref) is instead pi_ref_a exp(g_a / beta) / Z, g_a = E_{b~pi_ref}[p(a > b)].
- GRPO with RLOO advantages (unbiased) and the importance-weighted k3 loss (its gradient is
  grad KL(pi || pi_ref), see fastllm.rl.losses.kl_loss) follows grad J: fixed point pi*.
  Without the weight, E[grad k3] = grad KL(pi_ref || pi), and the fixed point is the optimum
  of E[r] - beta KL(pi_ref || pi): r_a + beta pi_ref_a / pi_a = lambda, solved by bisection.

The parameters are chosen so that pi_ref and the reverse-KL optimum are both far (TV > 0.05)
from pi*: a run that does not move, or that converges to the wrong optimum, fails.
"""

from __future__ import annotations

import torch

from fastllm.rl import (
    dpo_loss,
    gae,
    kl_k1,
    kl_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

R = torch.tensor([1.0, 0.2, -0.5, 0.6, 0.0], dtype=torch.float64)
PI_REF = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
BETA = 0.3
K = R.shape[0]
LOG_REF = PI_REF.log()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def optimum() -> torch.Tensor:
    """pi* = pi_ref exp(r / beta) / Z."""
    return torch.softmax(LOG_REF + R / BETA, 0)


def reverse_kl_optimum() -> torch.Tensor:
    """argmax E_pi[r] - beta KL(pi_ref || pi): pi_a = beta pi_ref_a / (lambda - r_a), sum = 1."""
    lo, hi = R.max().item() + 1e-12, R.max().item() + 10 * BETA  # sum is decreasing in lambda
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (BETA * PI_REF / (mid - R)).sum() > 1:
            lo = mid
        else:
            hi = mid
    pi = BETA * PI_REF / (lo - R)
    return pi / pi.sum()


def ipo_optimum() -> torch.Tensor:
    g = (torch.sigmoid(R[:, None] - R[None, :]) * PI_REF[None, :]).sum(1)
    return torch.softmax(LOG_REF + g / BETA, 0)


def test_closed_forms_are_optima_and_far_apart():
    def objective(pi, reverse=False):
        kl = (PI_REF * (PI_REF / pi).log()).sum() if reverse else (pi * (pi / PI_REF).log()).sum()
        return (pi * R).sum() - BETA * kl

    star, rev = optimum(), reverse_kl_optimum()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        other = torch.softmax(torch.log(star) + 0.3 * torch.randn(K, generator=gen, dtype=torch.float64), 0)
        assert objective(other) < objective(star)
        other = torch.softmax(torch.log(rev) + 0.3 * torch.randn(K, generator=gen, dtype=torch.float64), 0)
        assert objective(other, reverse=True) < objective(rev, reverse=True)
    assert tv(PI_REF, star) > 0.3
    assert tv(rev, star) > 0.05
    assert tv(PI_REF, ipo_optimum()) > 0.05 and tv(ipo_optimum(), star) > 0.05


def _sample(logits: torch.Tensor, n: int, gen: torch.Generator):
    with torch.no_grad():
        logp = torch.log_softmax(logits, 0)
        actions = torch.multinomial(logp.exp(), n, replacement=True, generator=gen)
    return actions, logp[actions][:, None]  # (n,), (n, 1): one response token per sample


def test_ppo_with_k1_penalty_in_the_reward_converges_to_the_optimum():
    gen = torch.Generator().manual_seed(0)
    iters, n, epochs, minibatches = 100, 512, 4, 2
    logits = LOG_REF.float().clone().requires_grad_(True)
    value = torch.zeros((), requires_grad=True)  # one state: the value is a scalar
    opt = torch.optim.Adam([logits, value], lr=0.05)
    total = iters * epochs * minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    assert tv(torch.softmax(logits.detach().double(), 0), optimum()) > 0.05
    mask = torch.ones(n, 1, dtype=torch.bool)
    for _ in range(iters):
        actions, old_logp = _sample(logits, n, gen)
        ref_logp = LOG_REF.float()[actions][:, None]
        rewards = R.float()[actions][:, None] - BETA * kl_k1(old_logp, ref_logp)
        old_values = value.detach().expand(n, 1)
        advantages, returns = gae(rewards, old_values, mask, 1.0, 1.0)
        advantages = whiten(advantages, mask)
        for _ in range(epochs):
            for rows in torch.randperm(n, generator=gen).view(minibatches, -1):
                logp = torch.log_softmax(logits, 0)[actions[rows]][:, None]
                pol = ppo_policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], 0.2)
                val = ppo_value_loss(value.expand(len(rows), 1), old_values[rows], returns[rows], mask[rows], 0.2)
                loss = pol.loss_sum / pol.normaliser + 0.5 * val.loss_sum / val.normaliser
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    pi = torch.softmax(logits.detach().double(), 0)
    assert tv(pi, optimum()) < 0.02, (pi, optimum())


def _pairs():
    """Every ordered pair (i chosen, j rejected) and its probability under pi_ref x pi_ref x BT."""
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    return i, j, PI_REF[i] * PI_REF[j] * torch.sigmoid(R[i] - R[j])


def _fit(loss_fn) -> torch.Tensor:
    logits = LOG_REF.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(torch.log_softmax(logits, 0))
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), 0)


def test_dpo_on_bradley_terry_preferences_converges_to_the_optimum():
    i, j, weight = _pairs()
    pi = _fit(lambda lp: (weight * dpo_loss(lp[i], lp[j], LOG_REF[i], LOG_REF[j], BETA).losses).sum())
    assert tv(pi, optimum()) < 1e-3, (pi, optimum())  # exact expected loss

    # sampled pairs and sampled labels: the empirical optimum is within sampling error
    gen = torch.Generator().manual_seed(0)
    n = 50_000
    a = torch.multinomial(PI_REF, n, replacement=True, generator=gen)
    b = torch.multinomial(PI_REF, n, replacement=True, generator=gen)
    a_wins = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(R[a] - R[b])
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    pi = _fit(lambda lp: dpo_loss(lp[chosen], lp[rejected], LOG_REF[chosen], LOG_REF[rejected], BETA).losses.mean())
    assert tv(pi, optimum()) < 0.05, (pi, optimum())


def test_ipo_on_bradley_terry_preferences_converges_to_its_optimum():
    i, j, weight = _pairs()
    pi = _fit(lambda lp: (weight * dpo_loss(lp[i], lp[j], LOG_REF[i], LOG_REF[j], BETA, "ipo").losses).sum())
    assert tv(pi, ipo_optimum()) < 1e-3, (pi, ipo_optimum())


def _grpo(importance_weighted: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    iters, groups, group_size, epochs = 200, 32, 16, 2
    n = groups * group_size
    logits = LOG_REF.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (iters * epochs))
    mask = torch.ones(n, 1, dtype=torch.bool)
    for _ in range(iters):
        actions, old_logp = _sample(logits, n, gen)
        ref_logp = LOG_REF.float()[actions][:, None]
        advantages = rloo_advantages(R.float()[actions], group_size)  # (n,): one per sequence
        for _ in range(epochs):
            logp = torch.log_softmax(logits, 0)[actions][:, None]
            pol = ppo_policy_loss(logp, old_logp, advantages, mask, 0.2, mode="seq_mean")
            kl_sum, kl_norm = kl_loss(logp, ref_logp, mask, "k3", old_logp=old_logp if importance_weighted else None,
                                      mode="seq_mean")
            loss = pol.loss_sum / pol.normaliser + BETA * kl_sum / kl_norm
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return torch.softmax(logits.detach().double(), 0)


def test_grpo_with_importance_weighted_k3_loss_converges_to_the_optimum():
    assert tv(PI_REF, optimum()) > 0.05
    pi = _grpo(importance_weighted=True)
    assert tv(pi, optimum()) < 0.02, (pi, optimum())


def test_grpo_with_plain_k3_loss_converges_to_the_reverse_kl_optimum():
    pi = _grpo(importance_weighted=False)
    assert tv(pi, reverse_kl_optimum()) < 0.02, (pi, reverse_kl_optimum())
    assert tv(pi, optimum()) > 0.05
