"""RLHF losses: PPO policy/value/entropy, KL loss term, DPO/IPO/cDPO, Bradley-Terry.

Per-token losses are (B, T), aligned with response tokens, masked by `mask` (B, T). Each
token-level loss returns a *sum* and the *normaliser* it is to be divided by, chosen by the
aggregation `mode`:

    "token_mean"    sum_{b,t} m x                / sum_{b,t} m                (DAPO: every token
                                                                              weighs the same)
    "seq_mean"      sum_b (sum_t m x / n_b)      / #{b : n_b > 0}             (mean over each
                                                      sequence, then over sequences; PPO/GRPO)
    "seq_sum_norm"  sum_{b,t} m x                / (B * max_len)               (Dr. GRPO: a fixed
                                                                              token budget)

with n_b = sum_t m_bt. Every sum and every normaliser is a sum over rows, so for any split of
the batch into micro-batches and ranks

    sum over parts of part_sum / sum over parts of part_normaliser  ==  full-batch loss

(`aggregation_normaliser` gives a part's normaliser from its mask alone, so a step loop can
all-reduce the global normaliser before the first backward and divide each micro-batch's sum
by it). For "seq_mean" a row with no real token adds 0 to the sum and 0 to the count; for
"seq_sum_norm" it still counts as a sequence of the budget.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_mask, check_2d, check_same_shape
from .kl import kl_estimate, kl_k3

AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")


# --------------------------------------------------------------------------- aggregation


def _check_mode(mode: str, max_len: int | None, T: int) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode: expected one of {AGGREGATIONS}, got {mode!r}")
    if mode == "seq_sum_norm":
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len: expected a positive integer for mode='seq_sum_norm', got {max_len!r}")
        if T > max_len:
            raise ValueError(f"max_len: expected at least the number of token columns {T}, got {max_len}")


def aggregation_normaliser(mask: Tensor, mode: str = "token_mean", max_len: int | None = None) -> Tensor:
    """The normaliser of `mode` for a (B, T) mask: a float32 0-dim tensor, additive over rows.

    token_mean: number of real tokens; seq_mean: number of rows with at least one real token;
    seq_sum_norm: B * max_len.
    """
    check_2d("mask", mask)
    _check_mode(mode, max_len, mask.shape[1])
    m = mask.to(torch.float32)
    if mode == "token_mean":
        return m.sum()
    if mode == "seq_mean":
        return (m.sum(dim=1) > 0).to(torch.float32).sum()
    return torch.tensor(float(mask.shape[0] * max_len), device=mask.device)


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str = "token_mean", max_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum, normaliser) of a (B, T) per-token quantity under `mode` (module docstring).

    The loss of the batch is sum / normaliser; across micro-batches and ranks, add the sums and
    the normalisers first. The sum keeps per_token's gradient.
    """
    check_2d("per_token", per_token)
    m = as_mask(mask, per_token, "per_token")
    normaliser = aggregation_normaliser(mask, mode, max_len)
    masked = per_token * m
    if mode == "seq_mean":
        lengths = m.sum(dim=1)
        total = (masked.sum(dim=1) / lengths.clamp_min(1)).sum()
    else:
        total = masked.sum()
    return total, normaliser


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp_min(1)


# --------------------------------------------------------------------------- PPO


class PolicyLoss(NamedTuple):
    loss_sum: Tensor  # 0-dim, differentiable
    normaliser: Tensor  # 0-dim float32
    clip_fraction: Tensor  # fraction of real tokens whose clipped branch is taken (detached)
    approx_kl: Tensor  # mean k3 estimate of KL(pi_old || pi) over real tokens (detached)
    tokens: Tensor  # number of real tokens (weights the two statistics across micro-batches)


class ValueLoss(NamedTuple):
    loss_sum: Tensor
    normaliser: Tensor
    clip_fraction: Tensor  # fraction of real tokens whose clipped error is the larger one


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2, *,
    clip_eps_high: float | None = None, mode: str = "token_mean", max_len: int | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), negated to be minimised, per token:

        rho_t  = exp(logp_t - old_logp_t)
        loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_eps, 1 + clip_eps_high))

    logp (B, T) is differentiable (current policy); old_logp (B, T) are the sampling policy's
    log-probs; advantages (B, T), or (B,) for one advantage per sequence (GRPO, RLOO);
    clip_eps_high defaults to clip_eps (DAPO's "clip-higher" sets it larger). Returns
    PolicyLoss: the aggregated sum and normaliser under `mode`, and detached statistics over
    the real tokens: clip_fraction (tokens where the clipped branch is strictly larger, so the
    token gives no gradient) and approx_kl, the k3 estimate of KL(pi_old || pi) with
    d = logp - old_logp: mean of exp(d) - 1 - d.
    """
    check_2d("logp", logp)
    check_same_shape("old_logp", old_logp, "logp", logp)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(
                f"advantages: expected (B,) with B={logp.shape[0]} or (B, T), got {tuple(advantages.shape)}"
            )
        advantages = advantages[:, None].expand_as(logp)
    check_same_shape("advantages", advantages, "logp", logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 < clip_eps < 1 and high > 0):
        raise ValueError(
            f"clip_eps, clip_eps_high: expected 0 < clip_eps < 1 and clip_eps_high > 0, got {clip_eps}, {high}"
        )
    m = as_mask(mask, logp, "logp")
    advantages = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    loss_sum, normaliser = aggregate(per_token, mask, mode, max_len)
    with torch.no_grad():
        clip_fraction = _masked_mean((clipped > unclipped).to(m.dtype), m)
        approx_kl = _masked_mean(kl_k3(old_logp, logp), m)
        tokens = m.sum()
    return PolicyLoss(loss_sum, normaliser, clip_fraction, approx_kl, tokens)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None = 0.2, *,
    mode: str = "token_mean", max_len: int | None = None,
) -> ValueLoss:
    """PPO's clipped value loss (as in OpenAI baselines / the PPO-for-RLHF implementations):

        v_clip_t = old_v_t + clip(v_t - old_v_t, -clip_eps, clip_eps)
        loss_t   = 0.5 * max((v_t - R_t)^2, (v_clip_t - R_t)^2)

    values (B, T) differentiable; old_values (B, T) from the rollout; returns (B, T) from gae.
    clip_eps=None gives the plain 0.5 (v_t - R_t)^2. Returns ValueLoss (sum, normaliser under
    `mode`, and the detached fraction of real tokens where the clipped error is the larger).
    """
    check_2d("values", values)
    check_same_shape("old_values", old_values, "values", values)
    check_same_shape("returns", returns, "values", values)
    m = as_mask(mask, values, "values")
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token = 0.5 * unclipped
        clipped_larger = torch.zeros_like(unclipped)
    else:
        if not clip_eps > 0:
            raise ValueError(f"clip_eps: expected a positive value or None, got {clip_eps}")
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_larger = (clipped > unclipped).to(m.dtype)
    loss_sum, normaliser = aggregate(per_token, mask, mode, max_len)
    with torch.no_grad():
        clip_fraction = _masked_mean(clipped_larger, m)
    return ValueLoss(loss_sum, normaliser, clip_fraction)


def entropy_bonus(
    entropy: Tensor, mask: Tensor, mode: str = "token_mean", max_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum, normaliser) of the per-token entropy (B, T) under `mode`.

    The bonus enters the minimised loss with a minus sign: loss = policy - coef * sum / normaliser.
    """
    return aggregate(entropy, mask, mode, max_len)


def kl_loss(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: str = "k3", *, old_logp: Tensor | None = None,
    mode: str = "token_mean", max_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum, normaliser) of a per-token KL estimate used as a loss term (GRPO's beta * D_KL).

    logp (B, T) differentiable; ref_logp (B, T) from the reference; tokens sampled from the
    old policy pi_old, whose log-probs are old_logp. Per token:

        old_logp is None:  k(logp, ref_logp)                            (GRPO paper's form)
        otherwise:         exp(logp - old_logp) * k(logp, ref_logp)     (importance-weighted)

    Where the gradient points (y ~ pi_old = pi, single-token view): the *value* of k1 and k3
    estimates KL(pi || pi_ref), but E[grad k1] = 0, and E[grad k3] = -sum_y pi_ref(y) grad log
    pi(y) = grad KL(pi_ref || pi): the unweighted k3 term pulls towards the reverse KL's optimum.
    With the weight, E_{pi_old}[rho k(y)] = sum_y pi(y) k(y) as a function of the parameters, so
    for k1 and k3 the gradient is exactly grad KL(pi || pi_ref), the KL of the RLHF objective
    (the same gradient the KL-in-reward form gives). At pi_old = pi the weight's value is 1, so
    the reported loss is unchanged.
    """
    check_2d("logp", logp)
    per_token = kl_estimate(logp, ref_logp, kind)
    if old_logp is not None:
        check_same_shape("old_logp", old_logp, "logp", logp)
        per_token = torch.exp(logp - old_logp) * per_token
    return aggregate(per_token, mask, mode, max_len)


# --------------------------------------------------------------------------- sequences


def sequence_logprobs(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """log pi(y) = sum_t m_t log pi(y_t | ...) per row: (B, T) -> (B,).

    average=True divides by the row's token count (length-normalised; 0 for an empty row).
    """
    check_2d("token_logps", token_logps)
    m = as_mask(mask, token_logps, "token_logps")
    total = (token_logps * m).sum(dim=1)
    return total / m.sum(dim=1).clamp_min(1) if average else total


# --------------------------------------------------------------------------- preferences


class DPOLoss(NamedTuple):
    losses: Tensor  # (P,) per pair, differentiable
    chosen_rewards: Tensor  # (P,) beta (logp_c - ref_logp_c), detached
    rejected_rewards: Tensor  # (P,) beta (logp_r - ref_logp_r), detached
    accuracy: Tensor  # (P,) 1.0 where chosen_rewards > rejected_rewards
    margin: Tensor  # (P,) chosen_rewards - rejected_rewards


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
) -> DPOLoss:
    """Direct preference optimisation (Rafailov et al. 2023) and its IPO / cDPO variants.

    Inputs are (P,) sequence log-probs of the chosen (c) and rejected (r) responses under the
    policy and the reference, by convention sums over the response tokens
    (`sequence_logprobs`). With h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r):

        sigmoid:  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                  eps = label_smoothing; eps = 0 is DPO, eps > 0 is conservative DPO (cDPO,
                  labels flipped with probability eps)
        ipo:      (h - 1 / (2 beta))^2          (Azar et al. 2023, eq. 17, tau = beta)

    IPO is stated on whatever log-probs are passed: summed ones follow the paper's
    log-likelihoods; TRL's trainer feeds IPO length-averaged log-probs instead
    (`sequence_logprobs(..., average=True)`), which changes what beta means.
    With Bradley-Terry preferences p(c > r) = sigmoid(r_c - r_r), the DPO loss's population
    optimum is pi = pi_ref exp(r / beta) / Z. Metrics (detached): implicit rewards
    beta (logp - ref_logp) of each side, accuracy (chosen reward > rejected) and margin.
    """
    for name, x in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        check_same_shape(name, x, "policy_chosen_logps", policy_chosen_logps)
    if not beta > 0:
        raise ValueError(f"beta: expected a positive value, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError(f"label_smoothing: expected 0 with loss_type='ipo', got {label_smoothing}")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio
        margin = chosen_rewards - rejected_rewards
        accuracy = (margin > 0).to(chosen_rewards.dtype)
    return DPOLoss(losses, chosen_rewards, rejected_rewards, accuracy, margin)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Reward-model loss on preference pairs: -log sigmoid(r_c - r_r - margin), per pair (P,).

    r_chosen, r_rejected: (P,) scalar rewards; margin: optional (P,) or scalar preference
    strength (Llama 2's margin component; None = 0). The maximum-likelihood fit of the
    Bradley-Terry model p(c > r) = sigmoid(r_c - r_r); sum and divide by the number of pairs.
    """
    check_same_shape("r_rejected", r_rejected, "r_chosen", r_chosen)
    diff = r_chosen - r_rejected
    if margin is not None:
        if isinstance(margin, Tensor) and margin.dim() > 0:
            check_same_shape("margin", margin, "r_chosen", r_chosen)
        diff = diff - margin
    return -F.logsigmoid(diff)
