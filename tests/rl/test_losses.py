"""PPO/value/KL/entropy losses, aggregation invariance, DPO/IPO/cDPO, Bradley-Terry: hand values."""

from __future__ import annotations

import math

import pytest
import torch

from fastllm.rl import (
    AGGREGATIONS,
    aggregate,
    aggregation_normaliser,
    bradley_terry_loss,
    dpo_loss,
    entropy_bonus,
    kl_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
)


def _softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- PPO, hand values

# Row 0 has 3 real tokens, row 1 has 1; old_logp = 0, so ratio = exp(logp).
RATIOS = [[1.5, 0.7, 1.3], [0.9, 5.0, 5.0]]
ADV = [[2.0, -1.0, -3.0], [1.0, 50.0, -50.0]]
MASK = [[1, 1, 1], [1, 0, 0]]
# clip_eps = 0.2, loss_t = max(-A rho, -A clip(rho, 0.8, 1.2)):
#   rho 1.5, A  2: max(-3.0, -2.4) = -2.4   clipped branch
#   rho 0.7, A -1: max( 0.7,  0.8) =  0.8   clipped branch
#   rho 1.3, A -3: max( 3.9,  3.6) =  3.9   unclipped (ratio outside, but the loss is worse)
#   rho 0.9, A  1: max(-0.9, -0.9) = -0.9   inside the range
PER_TOKEN = [-2.4, 0.8, 3.9, -0.9]


def _policy_inputs():
    logp = torch.tensor(RATIOS, dtype=torch.float64).log().requires_grad_(True)
    return logp, torch.zeros(2, 3, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def test_ppo_policy_loss_hand_values_every_mode():
    expected = {
        "token_mean": (sum(PER_TOKEN), 4.0),
        "seq_mean": ((-2.4 + 0.8 + 3.9) / 3 + (-0.9) / 1, 2.0),
        "seq_sum_norm": (sum(PER_TOKEN), 2.0 * 5),
    }
    for mode, (s, n) in expected.items():
        logp, old, adv, mask = _policy_inputs()
        out = ppo_policy_loss(logp, old, adv, mask, 0.2, mode=mode, max_len=5)
        assert out.loss_sum.item() == pytest.approx(s, rel=1e-12), mode
        assert out.normaliser.item() == n, mode
        assert out.clip_fraction.item() == pytest.approx(2 / 4)
        assert out.tokens.item() == 4
        # approx KL(pi_old || pi) = mean of rho - 1 - log rho over the 4 real tokens
        kl = sum(r - 1 - math.log(r) for r in (1.5, 0.7, 1.3, 0.9)) / 4
        assert out.approx_kl.item() == pytest.approx(kl, rel=1e-12)


def test_ppo_policy_gradient_vanishes_on_clipped_tokens():
    logp, old, adv, mask = _policy_inputs()
    out = ppo_policy_loss(logp, old, adv, mask, 0.2, mode="token_mean")
    out.loss_sum.backward()
    # d/dlogp of -A rho = -A rho on unclipped tokens, 0 on clipped and padded ones
    expected = torch.tensor([[0.0, 0.0, 3.0 * 1.3], [-0.9, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_clip_higher_and_sequence_advantages():
    logp, old, adv, mask = _policy_inputs()
    # clip_eps_high = 0.6: rho 1.5 with A 2 is no longer clipped (-3.0)
    out = ppo_policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.6)
    assert out.loss_sum.item() == pytest.approx(-3.0 + 0.8 + 3.9 - 0.9, rel=1e-12)
    assert out.clip_fraction.item() == pytest.approx(1 / 4)
    # (B,) advantages broadcast over the row: A = (1, -1)
    seq = ppo_policy_loss(logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, 0.2)
    # row 0, A = 1: max(-1.5, -1.2) = -1.2, max(-0.7, -0.8) = -0.7, max(-1.3, -1.2) = -1.2; row 1, A = -1: 0.9
    assert seq.loss_sum.item() == pytest.approx(-1.2 - 0.7 - 1.2 + 0.9, rel=1e-12)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="max_len"):
        ppo_policy_loss(logp, old, adv, mask, mode="seq_sum_norm", max_len=2)
    with pytest.raises(ValueError, match="mode"):
        ppo_policy_loss(logp, old, adv, mask, mode="mean")


def test_ppo_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.3, -1.0], [2.0, 9.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.4, 0.0], [2.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.35, -1.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor(MASK)
    # clip 0.2: v_clip = (0.7, 0.3, -0.2 | 2.3)
    #   0.5 max((1-2)^2, (0.7-2)^2)       = 0.5 * 1.69   = 0.845    clipped larger
    #   0.5 max((0.3-0.35)^2, same)        = 0.5 * 0.0025 = 0.00125
    #   0.5 max(0, (-0.2+1)^2)             = 0.5 * 0.64   = 0.32     clipped larger
    #   0.5 max((2-3)^2, (2.3-3)^2)        = 0.5 * 1      = 0.5
    out = ppo_value_loss(values, old, returns, mask, 0.2)
    assert out.loss_sum.item() == pytest.approx(0.845 + 0.00125 + 0.32 + 0.5, rel=1e-6)
    assert out.normaliser.item() == 4 and out.clip_fraction.item() == pytest.approx(0.5)
    out.loss_sum.backward()
    # gradient flows only through the larger branch: 0 where the clipped (constant) one wins
    expected = torch.tensor([[0.0, 0.3 - 0.35, 0.0], [2.0 - 3.0, 0.0, 0.0]])
    torch.testing.assert_close(values.grad, expected)
    plain = ppo_value_loss(values, old, returns, mask, None)
    assert plain.loss_sum.item() == pytest.approx(0.5 * (1 + 0.0025 + 0 + 1), rel=1e-6)


def test_entropy_kl_and_sequence_logprobs_hand_values():
    mask = torch.tensor(MASK)
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    s, n = entropy_bonus(ent, mask, "seq_mean")
    assert s.item() == pytest.approx(2.0 + 4.0) and n.item() == 2
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.25], [-2.0, 7.0, 7.0]])
    # k3 = e^d - 1 - d, d = ref - logp = (-0.5, 0, 0.25, 1)
    k3 = [math.exp(d) - 1 - d for d in (-0.5, 0.0, 0.25, 1.0)]
    s, n = kl_loss(logp, ref, mask, "k3")
    assert s.item() == pytest.approx(sum(k3), rel=1e-6) and n.item() == 4
    # importance-weighted: the value is unchanged at old = logp, scaled by rho otherwise
    s_w, _ = kl_loss(logp, ref, mask, "k3", old_logp=logp)
    assert s_w.item() == pytest.approx(sum(k3), rel=1e-6)
    old = logp - torch.log(torch.tensor(2.0))
    s_w, _ = kl_loss(logp, ref, mask, "k3", old_logp=old)
    assert s_w.item() == pytest.approx(2 * sum(k3), rel=1e-6)
    s, _ = kl_loss(logp, ref, mask, "k1")
    assert s.item() == pytest.approx(0.5 + 0.0 - 0.25 - 1.0, rel=1e-6)
    torch.testing.assert_close(sequence_logprobs(logp, mask), torch.tensor([-3.5, -3.0]))
    torch.testing.assert_close(sequence_logprobs(logp, mask, average=True), torch.tensor([-3.5 / 3, -3.0]))


# --------------------------------------------------------------------------- aggregation invariance


def _random_batch(B: int, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[2] = 0  # an empty row
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]

    def rnd(scale=1.0):
        return scale * torch.randn(B, T, generator=gen, dtype=torch.float64)

    return dict(logp=rnd(0.3) - 1.0, old=rnd(0.3) - 1.0, ref=rnd(0.3) - 1.0, adv=rnd(), values=rnd(),
                old_values=rnd(), returns=rnd(), entropy=rnd().abs(), mask=mask)


def _losses(data, rows, mode, max_len):
    """Each loss's (sum, normaliser) on the given rows; logp and values are leaves for gradients."""
    d = {k: v[rows] for k, v in data.items()}
    logp = d["logp"].clone().requires_grad_(True)
    values = d["values"].clone().requires_grad_(True)
    pol = ppo_policy_loss(logp, d["old"], d["adv"], d["mask"], 0.2, mode=mode, max_len=max_len)
    val = ppo_value_loss(values, d["old_values"], d["returns"], d["mask"], 0.2, mode=mode, max_len=max_len)
    ent = entropy_bonus(d["entropy"] * logp.exp(), d["mask"], mode, max_len)
    kl = kl_loss(logp, d["ref"], d["mask"], "k3", old_logp=d["old"], mode=mode, max_len=max_len)
    return [(pol.loss_sum, pol.normaliser), (val.loss_sum, val.normaliser), ent, kl], logp, values


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batch_and_rank_splits_give_the_full_batch_loss(mode):
    B, T, max_len = 10, 9, 12
    data = _random_batch(B, T, seed=7)
    full, logp_full, values_full = _losses(data, torch.arange(B), mode, max_len)
    full_loss = sum(s / n for s, n in full)
    full_loss.backward()

    # two "ranks", each with its own micro-batches of uneven sizes
    ranks = [[torch.tensor([0, 1, 2]), torch.tensor([3])], [torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9])]]
    parts = [rows for rank in ranks for rows in rank]
    # the global normalisers come from the masks alone (summed over ranks before any backward)
    norms = [sum(aggregation_normaliser(data["mask"][rows], mode, max_len) for rows in parts)] * 4
    for (_, n_full), n in zip(full, norms):
        assert n.item() == n_full.item()
    split_loss = 0.0
    grad_logp = torch.zeros(B, T, dtype=torch.float64)
    grad_values = torch.zeros(B, T, dtype=torch.float64)
    naive = [0.0] * 4  # mean of per-part losses: what the invariance must NOT equal
    for rows in parts:
        pieces, logp, values = _losses(data, rows, mode, max_len)
        part = sum(s / n for (s, _), n in zip(pieces, norms))
        part.backward()
        split_loss += part.item()
        grad_logp[rows] += logp.grad
        grad_values[rows] += values.grad
        for i, (s, n) in enumerate(pieces):
            naive[i] += (s / n.clamp_min(1)).item() / len(parts)
    assert split_loss == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad_logp, logp_full.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_values, values_full.grad, rtol=1e-12, atol=1e-14)
    # the check is sensitive: averaging per-part means gives a different number on ragged data
    assert abs(sum(naive) - full_loss.item()) > 1e-3


def test_aggregate_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert [t.item() for t in aggregate(x, mask, "token_mean")] == [7.0, 3.0]
    assert [t.item() for t in aggregate(x, mask, "seq_mean")] == [1.5 + 4.0, 2.0]
    assert [t.item() for t in aggregate(x, mask, "seq_sum_norm", max_len=4)] == [7.0, 12.0]


# --------------------------------------------------------------------------- preferences


def test_dpo_ipo_cdpo_hand_values():
    beta = 0.5
    pc = torch.tensor([-3.0, -10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -9.0], dtype=torch.float64)
    rc = torch.tensor([-3.5, -9.5], dtype=torch.float64)
    rr = torch.tensor([-3.5, -9.0], dtype=torch.float64)
    # pair 0: chosen log-ratio 0.5, rejected -0.5, h = 1; pair 1: chosen -0.5, rejected 0, h = -0.5
    out = dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(out.losses, torch.tensor([_softplus(-0.5), _softplus(0.25)], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -0.25], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.margin, torch.tensor([0.5, -0.25], dtype=torch.float64))
    torch.testing.assert_close(out.accuracy, torch.tensor([1.0, 0.0], dtype=torch.float64))
    out.losses.sum().backward()
    # d/dlogp_c of -log sigmoid(beta h) = -beta sigmoid(-beta h)
    sig = [1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.25))]
    torch.testing.assert_close(pc.grad, torch.tensor([-beta * sig[0], -beta * sig[1]], dtype=torch.float64))

    cdpo = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    expected = [0.9 * _softplus(-0.5) + 0.1 * _softplus(0.5), 0.9 * _softplus(0.25) + 0.1 * _softplus(-0.25)]
    torch.testing.assert_close(cdpo.losses, torch.tensor(expected, dtype=torch.float64))

    # IPO: (h - 1 / (2 beta))^2 = (1 - 1)^2, (-0.5 - 1)^2
    ipo = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    torch.testing.assert_close(ipo.losses, torch.tensor([0.0, 2.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(pc, pr, rc, rr[:1], beta)


def test_bradley_terry_hand_values():
    rc = torch.tensor([1.0, 0.0], dtype=torch.float64)
    rj = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(rc, rj), torch.tensor([_softplus(-0.5), _softplus(2.0)],
                                                                         dtype=torch.float64))
    margin = torch.tensor([0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(rc, rj, margin),
                               torch.tensor([_softplus(-0.25), _softplus(2.0)], dtype=torch.float64))
    torch.testing.assert_close(bradley_terry_loss(rc, rj, 1.0),
                               torch.tensor([_softplus(0.5), _softplus(3.0)], dtype=torch.float64))
