"""The PPO trainer: its first update's loss is the PPO math applied by hand to the rollout; on a
K-armed bandit (one-token responses) it reaches the closed-form optimum pi_ref exp(r / beta) / Z;
on a tiny decoder it lifts a computable gold reward (from the gold function, and from a reward
model trained on gold-labelled pairs) with the KL bounded; a SIGKILLed run resumes on the same
trajectory; `fastllm ppo` runs from YAML with overrides; 2 processes update as 1."""

import copy
import importlib
import json
import os
import signal
import time

import pytest
import torch

from fastllm import models
from fastllm.rl import bradley_terry_loss
from fastllm.train import ppo
from fastllm.train.checkpoint import list_checkpoints
from fastllm.train.logging import read_metrics

from .conftest import as_args, run_cli
from .rl_helpers import (
    BETA,
    EOS,
    TARGET,
    arm_reward,
    assert_split_update_matches,
    bandit_policy,
    gold_reward,
    next_token_dist,
    total_variation,
)
from .rl_helpers import gold_of_samples as _gold_of_samples
from .rl_helpers import gold_prompts as _gold_prompts
from .rl_helpers import quiet as _quiet
from .rl_helpers import tiny_policy as _policy

ppo_mod = importlib.import_module("fastllm.train.ppo")  # the module (fastllm.train.ppo is the function)


# --------------------------------------------------------------------------- the first update by hand


def test_first_update_loss_equals_the_math_by_hand(tmp_path, monkeypatch):
    policy, ref = _policy(0), _policy(1)  # policy and reference differ, so the KL is not 0
    initial = copy.deepcopy(policy)
    captured = []
    real = ppo_mod.collect_rollout

    def capture(*args, **kw):
        roll = real(*args, **kw)
        captured.append(roll)
        return roll

    monkeypatch.setattr(ppo_mod, "collect_rollout", capture)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9], [1, 4]]
    beta, vf, ent_c, lam, T = 0.2, 0.1, 0.01, 0.95, 0.8

    def reward_fn(p, r):
        return [0.3 * len(x) - 1.0 for x in r]

    ppo(_quiet(tmp_path, max_steps=1, batch_size=4, grad_accum=2, max_new_tokens=5, ppo_epochs=1, kl_coef=beta,
               vf_coef=vf, entropy_coef=ent_c, lam=lam, temperature=T, no_eos_score=-2.0, lr=1e-3),
        model=policy, prompts=prompts, reward_fn=reward_fn, reference_model=ref)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    batch = captured[0]["batch"]
    B, N = 4, 5
    with torch.no_grad():
        lp = {}
        for name, m in (("pi", initial), ("ref", ref)):
            logits = m.logits(m(batch.tokens, attention_mask=batch.attention_mask)).double() / T
            lp[name] = torch.log_softmax(logits, -1)
    tok_logp, entropy, scores = {k: torch.zeros(B, N, dtype=torch.float64) for k in lp}, torch.zeros(B, N), []
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        p, n = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        resp = batch.tokens[b, p:p + n].tolist()
        scores.append(0.3 * n - 1.0 if resp[-1] == EOS else -2.0)
        for j in range(n):  # response token j is predicted at position p - 1 + j
            mask[b, j] = True
            for k in lp:
                tok_logp[k][b, j] = lp[k][b, p - 1 + j, resp[j]]
            row = lp["pi"][b, p - 1 + j]
            entropy[b, j] = float(-(row.exp() * row).sum())
    assert captured[0]["scores"].tolist() == pytest.approx(scores)
    # rewards: -beta k1 per token, the score at the last token; critic starts at 0 (zero head)
    rewards = -beta * (tok_logp["pi"] - tok_logp["ref"]) * mask
    for b in range(B):
        rewards[b, int(mask[b].sum()) - 1] += scores[b]
    adv = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):  # naive GAE with V = 0, gamma = 1
        running = 0.0
        for j in reversed(range(int(mask[b].sum()))):
            running = float(rewards[b, j]) + lam * running
            adv[b, j] = running
    returns = adv.clone()
    a = adv[mask]
    white = (a - a.mean()) / torch.sqrt(a.var(unbiased=True) + 1e-8)
    n_tok = float(mask.sum())
    policy_loss = float(-white.sum()) / n_tok  # ratio 1 at the first update
    value_loss = float(0.5 * (returns[mask] ** 2).sum()) / n_tok
    want = policy_loss + vf * value_loss - ent_c * float(entropy[mask].sum()) / n_tok
    assert rec["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert rec["value/loss"] == pytest.approx(value_loss, rel=1e-4)
    assert rec["kl"] == pytest.approx(float(((tok_logp["pi"] - tok_logp["ref"]) * mask).sum()) / B, rel=1e-4,
                                      abs=1e-5)
    assert rec["policy/clip_fraction"] == 0.0 and abs(rec["policy/approx_kl"]) < 1e-6
    assert rec["tokens"] == int(mask.sum()) and rec["response_length"] == pytest.approx(n_tok / B)
    assert abs(want) > 1e-2


# --------------------------------------------------------------------------- the bandit


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_bandit_reaches_the_kl_regularised_optimum(tmp_path, critic):
    """Vocabulary = the K arms, prompt [0], max_new_tokens=1 and no EOS: a response is exactly one
    arm. pi_ref = the initial policy's next-token distribution (sharpened to be far from uniform
    and from pi*); PPO with k1 in the reward must end within total variation 0.05 of
    pi* = pi_ref exp(r / beta) / Z."""
    policy, pi_ref, pi_star = bandit_policy()
    assert total_variation(pi_ref, pi_star) > 0.3  # the run must move far

    ppo(_quiet(tmp_path, max_steps=100, batch_size=64, max_new_tokens=1, no_eos_score=None, kl_coef=BETA,
               ppo_epochs=2, lr=1e-3, schedule="cosine", min_lr_ratio=0.05, critic=critic, vf_coef=0.5,
               max_grad_norm=None), model=policy, prompts=[[0]] * 64, reward_fn=arm_reward)
    pi = next_token_dist(policy)
    tv = total_variation(pi, pi_star)
    assert tv < 0.05, (pi.tolist(), pi_star.tolist(), tv)


# --------------------------------------------------------------------------- a computable gold reward


def _gold_fields(out, **kw):
    return _quiet(out, batch_size=32, max_new_tokens=6, ppo_epochs=2, lr=3e-3, kl_coef=0.02, no_eos_score=0.0,
                  vf_coef=0.5, **kw)


def test_gold_reward_rises_with_bounded_kl(tmp_path):
    result = ppo(_gold_fields(tmp_path, max_steps=40), model=_policy(0), prompts=_gold_prompts(64),
                 reward_fn=gold_reward)
    reward, kl = read_metrics(tmp_path / "metrics.jsonl", "reward/mean"), read_metrics(tmp_path / "metrics.jsonl",
                                                                                        "kl")
    first, last = sum(reward[s] for s in (1, 2, 3)) / 3, sum(reward[s] for s in (38, 39, 40)) / 3
    assert first < 0.1 and last > first + 0.3, (first, last)
    assert max(kl.values()) < 10.0, kl
    assert result["reward"] == reward[40]


def test_reward_model_trained_on_gold_pairs_lifts_the_gold_reward(tmp_path):
    """A tiny reward model fitted (Bradley-Terry) on pairs of random responses labelled by the gold
    reward; PPO against it raises the gold reward of the policy's samples."""
    torch.manual_seed(0)
    cfg = models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1)
    rm = models.build_head_model(cfg, "sequence_classification", models.TaskHead(num_labels=1))
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(512):
        n = int(torch.randint(1, 6, (1,), generator=g))
        body = torch.where(torch.rand(n, generator=g) < 0.5, TARGET, torch.randint(3, 12, (n,), generator=g))
        seqs.append([1, 5] + body.tolist() + [EOS])
    gold = torch.tensor(gold_reward(None, [s[2:] for s in seqs]))
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    for _ in range(150):
        i, j = torch.randint(0, 512, (2, 64), generator=g)
        keep = gold[i] != gold[j]
        win = torch.where(gold[i] > gold[j], i, j)[keep]
        lose = torch.where(gold[i] > gold[j], j, i)[keep]
        r = rm.scores(ids[torch.cat([win, lose])], attention_mask=att[torch.cat([win, lose])])[:, 0]
        loss = bradley_terry_loss(r[:len(win)], r[len(win):]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = rm.predict(ids, attention_mask=att)
    assert torch.corrcoef(torch.stack([pred, gold]))[0, 1] > 0.8

    policy = _policy(0)
    prompts = [[1, 5]] * 32
    before = _gold_of_samples(policy, prompts)
    ppo(_gold_fields(tmp_path, max_steps=25), model=policy, prompts=prompts, reward_model=rm)
    after = _gold_of_samples(policy, prompts)
    assert after > before + 0.2, (before, after)


# --------------------------------------------------------------------------- CLI, resume, processes


def _cli_fields(tok_dir, prompts_file, out, **kw) -> dict:
    return dict(model="tiny-llama", model_overrides={"num_hidden_layers": 1}, tokenizer=tok_dir,
                data=str(prompts_file), output_dir=str(out), batch_size=4, max_new_tokens=6, ppo_epochs=2,
                grad_accum=2, lr=1e-3, reward_fn="tests.train.test_ppo:gold_reward", progress=False, plot=False,
                seed=3, **kw)


def test_sigkill_then_resume_repeats_the_trajectory(tmp_path, tok_dir, prompts_file):
    fields = dict(max_steps=14, save_every=3, kl_target=0.5, kl_coef=0.1)  # adaptive beta: its state resumes too
    ref = run_cli(["ppo", *as_args(_cli_fields(tok_dir, prompts_file, tmp_path / "ref", **fields))], background=True)
    run_dir = tmp_path / "run"
    proc = run_cli(["ppo", *as_args(_cli_fields(tok_dir, prompts_file, run_dir, **fields))], background=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 8:  # past the checkpoints at 3 and 6
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    rc = proc.wait(timeout=60)
    assert ref.wait(timeout=240) == 0, ref.stdout.read().decode()[-3000:]
    assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc={rc}): {proc.stdout.read().decode()[-2000:]}"
    last_ckpt = int(list_checkpoints(run_dir)[-1].name.split("_")[1])
    assert 6 <= last_ckpt < 14
    resumed = run_cli(["ppo", *as_args(_cli_fields(tok_dir, prompts_file, run_dir, **fields))])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for key in ("loss", "reward/mean", "kl", "kl_coef", "response_length"):
        want, got = read_metrics(tmp_path / "ref" / "metrics.jsonl", key), read_metrics(metrics, key)
        assert list(got) == list(want) == list(range(1, 15)), key
        assert got == want, (key, {s: (got[s], want[s]) for s in got if got[s] != want[s]})
    kl_coef = read_metrics(metrics, "kl_coef")
    assert kl_coef[14] != kl_coef[1]  # the controller did move


def test_cli_yaml_with_overrides(tmp_path, tok_dir, prompts_file):
    fields = _cli_fields(tok_dir, prompts_file, tmp_path / "out", max_steps=2)
    config = tmp_path / "ppo.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    res = run_cli(["ppo", str(config), "kl_coef=0.3", "critic=shared", "plot=true"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 2
    assert "kl_coef: 0.3" in (tmp_path / "out" / "config.yaml").read_text()
    rec = read_metrics(tmp_path / "out" / "metrics.jsonl", "kl_coef")
    assert rec == {1: 0.3, 2: 0.3}
    assert (tmp_path / "out" / "ppo_curves.png").is_file()
    assert (tmp_path / "out" / "critic" / "value_head.safetensors").is_file()
    assert models.from_pretrained(tmp_path / "out" / "final").config.num_hidden_layers == 1
    help_text = run_cli(["ppo", "--help"]).stdout
    assert "kl_estimator" in help_text and "loss_aggregation" in help_text


def test_two_processes_update_as_one(tmp_path):
    """On the same rollout, 2 gloo processes (each its half of the rows) and 1 process (all rows)
    end the update (2 epochs of one minibatch step over 2 micro-batches, KL as a loss term) with
    the same losses and weights, for every loss aggregation."""
    assert_split_update_matches("ppo_split_worker.py", tmp_path)


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="batch_size: expected a multiple of num_minibatches"):
        ppo(_quiet(tmp_path, batch_size=6, num_minibatches=4), model=_policy(0), prompts=[[1]] * 8,
            reward_fn=gold_reward)
    with pytest.raises(ValueError, match="expected a reward model and/or a reward function"):
        ppo(_quiet(tmp_path, batch_size=2), model=_policy(0), prompts=[[1]] * 8)
    with pytest.raises(ValueError, match="reward_fn: expected \"module:function\""):
        ppo(_quiet(tmp_path, batch_size=2, reward_fn="nothing"), model=_policy(0), prompts=[[1]] * 8)
    with pytest.raises(ValueError, match="distributed: PPO supports ddp \\(or none\\), got fsdp"):
        ppo(_quiet(tmp_path, batch_size=2, distributed="fsdp"), model=_policy(0), prompts=[[1]] * 8,
            reward_fn=gold_reward)
