"""GAE, whitening and group baselines against naive loops and hand computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fastllm.rl import gae, group_advantages, rloo_advantages, whiten


def _gae_naive(rewards: list[float], values: list[float], length: int, gamma: float, lam: float) -> list[float]:
    """One row, real tokens 0..length-1, the value after the last real token taken as 0."""
    adv = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def _ragged(B: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    lengths = torch.randint(0, T + 1, (B,), generator=gen).tolist()
    lengths[0] = T  # a full row
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return mask, lengths


@pytest.mark.parametrize("B,T", [(1, 1), (4, 1), (3, 7), (6, 13), (2, 40)])
def test_gae_matches_naive_loop_on_ragged_batches(B, T):
    gen = torch.Generator().manual_seed(B * 100 + T)
    rng = random.Random(B * 100 + T)
    for _ in range(3):
        gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
        mask, lengths = _ragged(B, T, gen)
        rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
        values = torch.randn(B, T, generator=gen, dtype=torch.float64)
        # garbage after each row's end must not leak in
        rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
        values = torch.where(mask, values, torch.full_like(values, -1e6))
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for b in range(B):
            L = lengths[b]
            expected = _gae_naive(rewards[b].tolist(), values[b].tolist(), L, gamma, lam)
            torch.testing.assert_close(adv[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
            exp_ret = [expected[t] + values[b, t].item() if t < L else 0.0 for t in range(T)]
            torch.testing.assert_close(ret[b], torch.tensor(exp_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gae_float32_and_hand_values():
    # one row of 3 tokens, gamma=0.5, lam=0.5, V = (1, 2, 3), r = (0, 0, 1), value after the end = 0:
    # delta = (0 + 0.5*2 - 1, 0 + 0.5*3 - 2, 1 + 0 - 3) = (0, -0.5, -2)
    # A_2 = -2; A_1 = -0.5 + 0.25*(-2) = -1; A_0 = 0 + 0.25*(-1) = -0.25
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 0.5, 0.5)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -1.0, -2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 1.0, 1.0, 0.0]]))


def test_gae_rejects_gaps_and_bad_shapes():
    with pytest.raises(ValueError, match="mask"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3), 1.0, 1.0)


def test_whiten_hand_computation():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # masked values 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), expected)
    expected_kept = torch.tensor([[-1.5 / std + 2.5, -0.5 / std + 2.5, 0.5 / std + 2.5], [1.5 / std + 2.5, 0.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), expected_kept)


def test_group_and_rloo_advantages_match_naive_loops():
    gen = torch.Generator().manual_seed(3)
    for G in (2, 3, 8):
        rewards = torch.randn(4 * G, generator=gen, dtype=torch.float64)
        grpo = group_advantages(rewards, G, scale_std=True, eps=1e-6)
        drgrpo = group_advantages(rewards, G, scale_std=False)
        rloo = rloo_advantages(rewards, G)
        for g in range(4):
            group = rewards[g * G:(g + 1) * G].tolist()
            mean = sum(group) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
            for i, x in enumerate(group):
                others = [y for k, y in enumerate(group) if k != i]
                assert grpo[g * G + i].item() == pytest.approx((x - mean) / (std + 1e-6), rel=1e-12)
                assert drgrpo[g * G + i].item() == pytest.approx(x - mean, rel=1e-12, abs=1e-14)
                assert rloo[g * G + i].item() == pytest.approx(x - sum(others) / (G - 1), rel=1e-12, abs=1e-14)


def test_group_advantages_argument_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.zeros(2, 3), 3)
