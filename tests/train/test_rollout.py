"""The rollout pieces (fastllm.train.rollout): targets and response-aligned masks from generate's
rows, log-probs equal to generate's own and to full float64 logits, the score at the last real
token (EOS, never a pad), the missing-EOS score, and the KL-penalised rewards."""

import torch

from fastllm import models
from fastllm.rl import kl_k1, kl_k3, whiten
from fastllm.train.distributed import DistInfo
from fastllm.train.ppo import whiten_pooled
from fastllm.train.rollout import (
    kl_penalised_rewards,
    policy_logprobs,
    response_batch,
    sample_responses,
    score_responses,
    to_response,
)

EOS, PAD = 2, 0


def _policy(seed=0, vocab=12):
    torch.manual_seed(seed)
    return models.build_model(models.preset("tiny-llama", vocab_size=vocab, num_hidden_layers=1))


def _rollout(seed=0):
    policy = _policy(seed)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 4]]
    torch.manual_seed(seed)
    out = sample_responses(policy, prompts, max_new_tokens=6, temperature=0.7, eos_id=EOS, pad_id=PAD)
    return policy, prompts, out, response_batch(out, 6)


def test_targets_masks_and_logprobs_match_generate_and_full_logits():
    for seed in range(4):
        policy, prompts, out, batch = _rollout(seed)
        B, L = out.tokens.shape
        for b, p in enumerate(prompts):
            n = int(batch.response_lengths[b])
            resp = out.tokens[b, len(p):len(p) + n].tolist()
            assert batch.responses()[b] == resp and batch.prompts()[b] == p
            assert batch.mask[b].tolist() == [j < n for j in range(6)]
            for t in range(L):  # position t scores token t + 1, only inside the response
                want = int(out.tokens[b, t + 1]) if len(p) - 1 <= t < len(p) - 1 + n else -100
                assert int(batch.targets[b, t]) == want, (b, t)
            assert batch.attention_mask[b].tolist() == [t < len(p) + n for t in range(L)]
        with torch.no_grad():
            logp, entropy = policy_logprobs(policy, batch, temperature=0.7)
            logits = policy.logits(policy(batch.tokens, attention_mask=batch.attention_mask)).double() / 0.7
        full = torch.log_softmax(logits, -1)
        valid = batch.targets != -100
        want = torch.where(valid, full.gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0], 0.0)
        torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy.double()[valid], -(full.exp() * full).sum(-1)[valid], rtol=1e-5, atol=1e-5)
        # generate's own log-probs sit on the token, ours on the position before it
        gen = torch.zeros_like(logp)
        gen[:, :-1] = out.logprobs[:, 1:]
        torch.testing.assert_close(logp[valid], gen[valid], rtol=1e-4, atol=1e-4)
        # response-aligned: column j = response token j
        r = to_response(logp, batch.starts, 6)
        for b, p in enumerate(prompts):
            for j in range(int(batch.response_lengths[b])):
                assert abs(float(r[b, j]) - float(out.logprobs[b, len(p) + j])) < 1e-4


def test_score_at_last_token_and_missing_eos():
    tokens = torch.tensor([[1, 4, 5, EOS, PAD, PAD], [1, 4, 6, 7, 8, 9], [1, 3, EOS, PAD, PAD, PAD]])
    lengths, plens = torch.tensor([4, 6, 3]), torch.tensor([2, 2, 2])
    resp = (torch.arange(6)[None] >= plens[:, None]) & (torch.arange(6)[None] < lengths[:, None])
    out = type("Out", (), dict(tokens=tokens, response_mask=resp, lengths=lengths, prompt_lengths=plens))
    batch = response_batch(out, 4)
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]

    def fn(prompts, responses):
        return [10.0 * len(r) for r in responses]

    scores, eos = score_responses(batch, reward_fn=fn, eos_id=EOS, no_eos_score=-1.0)
    assert eos.tolist() == [True, False, True]
    assert scores.tolist() == [20.0, -1.0, 10.0]
    kept, _ = score_responses(batch, reward_fn=fn, eos_id=EOS, no_eos_score=None)
    assert kept.tolist() == [20.0, 40.0, 10.0]
    # the reward model reads the last real token: its score changes with that token only
    rm = models.build_head_model(models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1),
                                 "sequence_classification", models.TaskHead(num_labels=1))
    got, _ = score_responses(batch, reward_model=rm, eos_id=EOS)
    with torch.no_grad():
        want = [float(rm.predict(tokens[b:b + 1, :int(lengths[b])])[0]) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_kl_penalised_rewards():
    torch.manual_seed(0)
    logp, ref = -torch.rand(3, 5), -torch.rand(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0])
    for est, fn in (("k1", kl_k1), ("k3", kl_k3)):
        rewards, kl = kl_penalised_rewards(scores, logp, ref, mask, 0.1, est)
        want = -0.1 * fn(logp, ref) * mask
        want[0, 2] += 2.0
        want[1, 4] -= 1.0  # an empty row gets no score
        torch.testing.assert_close(rewards, want)
        torch.testing.assert_close(kl, fn(logp, ref) * mask)


def test_whiten_pooled_single_rank_equals_whiten():
    torch.manual_seed(0)
    x, mask = torch.randn(4, 6), torch.rand(4, 6) > 0.3
    for shift in (True, False):
        torch.testing.assert_close(whiten_pooled(x, mask, DistInfo(), shift_mean=shift), whiten(x, mask, shift))
