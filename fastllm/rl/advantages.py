"""Advantages for policy-gradient RLHF: GAE (PPO), whitening, group baselines (GRPO, RLOO).

Per-token tensors are (B, T), aligned with the response tokens, with a `mask` (B, T) (bool or
0/1) marking real tokens; rows are right-padded (each row's real tokens are a prefix of it).
Everything here returns tensors without gradient: advantages and returns are targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import as_mask, check_2d, check_group_size, check_same_shape


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on a ragged, right-padded batch.

    rewards, values, mask: (B, T). With m_t the mask and V_T = 0,

        delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}        (A_T = 0)
        R_t     = A_t + V_t                                      (the value targets)

    so the value of the token after a row's last real token is 0: no bootstrapping across
    padding, and rewards/values at padded positions are ignored. Returns (advantages, returns),
    each (B, T) in float32 (float64 for float64 inputs), 0 outside the mask. `mask` must be
    right-padded (non-increasing along T): a hole in the middle of a row would silently cut
    the recursion, so it is rejected.
    """
    check_2d("rewards", rewards)
    check_same_shape("values", values, "rewards", rewards)
    acc = _acc_dtype(rewards.dtype)
    m = as_mask(mask, rewards, "rewards").to(acc)
    if m.shape[1] > 1 and bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("mask: expected right-padded rows (real tokens a prefix of each row), got a gap")
    r = rewards.to(acc) * m
    v = values.to(acc) * m
    B, T = r.shape
    advantages = torch.zeros_like(r)
    running = torch.zeros(B, dtype=acc, device=r.device)  # A_{t+1}
    next_value = torch.zeros(B, dtype=acc, device=r.device)  # m_{t+1} V_{t+1}
    next_mask = torch.zeros(B, dtype=acc, device=r.device)  # m_{t+1}
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
        next_value, next_mask = v[:, t], m[:, t]
    advantages = advantages * m
    return advantages, (advantages + v) * m


@torch.no_grad()
def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x to zero mean and unit variance over its masked elements.

    x, mask: same shape (usually (B, T)). With n = sum(mask),

        mean = sum(m x) / n
        var  = sum(m (x - mean)^2) / (n - 1)      unbiased (Bessel), as TRL and OpenRLHF
        out  = (x - mean) / sqrt(var + eps)        (+ mean when shift_mean=False)

    and 0 outside the mask. With a single masked element var is taken as 0 (the denominator is
    max(n - 1, 1)). The statistics are those of this tensor only: whitening a rank's or a
    micro-batch's slice gives a different result from whitening the whole batch, so whiten the
    whole rollout batch before splitting it.
    """
    acc = _acc_dtype(x.dtype)
    m = as_mask(mask, x, "x").to(acc)
    xf = x.to(acc)
    n = m.sum()
    mean = (xf * m).sum() / n.clamp_min(1)
    var = ((xf - mean) ** 2 * m).sum() / (n - 1).clamp_min(1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps).

    rewards: (B,), B = num_groups * group_size, rows [g G, (g + 1) G) answering the same prompt.
    mean_g and std_g are the group's mean and unbiased (Bessel) standard deviation, as in
    TRL's GRPO. scale_std=False gives Dr. GRPO's r_i - mean_g (Liu et al. 2025). Returns (B,)
    in float32 (float64 for float64 inputs); broadcast it over a row's tokens with
    `A[:, None] * mask`.

    Note on fixed points: r_i - mean_g includes r_i in its own baseline, so in expectation it
    is (G - 1) / G times an unbiased advantage (rloo_advantages removes that factor), and the
    division by std_g rescales the reward per group; both change the optimum of a
    KL-regularised objective away from pi_ref exp(r / beta).
    """
    num_groups = check_group_size(rewards, group_size, minimum=2)
    r = rewards.to(_acc_dtype(rewards.dtype)).view(num_groups, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantage (Kool et al. 2019; Ahmadian et al. 2024).

    rewards: (B,) in groups of G consecutive rows as in group_advantages. Each sample's
    baseline is the mean reward of the other G - 1 samples of its group:

        A_i = r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g)

    The baseline does not depend on sample i, so E[A_i grad log pi(y_i)] is the unbiased
    policy gradient of E[r]. Returns (B,) in float32 (float64 for float64 inputs).
    """
    num_groups = check_group_size(rewards, group_size, minimum=2)
    r = rewards.to(_acc_dtype(rewards.dtype)).view(num_groups, group_size)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)
