"""Problems with known answers shared by the PPO and GRPO trainer tests: tiny decoders, the
K-armed bandit (vocabulary = arms, prompt [0], one-token responses) with its KL-regularised
optimum, and a computable gold reward on a 12-token vocabulary."""

from __future__ import annotations

import torch

from fastllm import models

EOS = 2  # tiny-llama's eos_token_id
TARGET = 7

R_ARMS = torch.tensor([1.0, 0.2, -0.5, 0.6, 0.0], dtype=torch.float64)
BETA = 0.3


def tiny_policy(seed: int, vocab: int = 12, layers: int = 1):
    torch.manual_seed(seed)
    return models.build_model(models.preset("tiny-llama", vocab_size=vocab, num_hidden_layers=layers))


def quiet(out, **kw) -> dict:
    """Config fields of a quiet, fresh, seeded run into `out`."""
    return {"output_dir": str(out), "progress": False, "plot": False, "resume": None, "seed": 0, **kw}


def gold_reward(prompts, responses):
    """Share of TARGET tokens in the response; 0 unless the response ends with EOS."""
    return [sum(t == TARGET for t in r[:-1]) / max(len(r) - 1, 1) if r and r[-1] == EOS else 0.0 for r in responses]


def gold_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 12, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def gold_of_samples(policy, prompts, max_new_tokens: int = 6) -> float:
    """Mean gold reward of 4 fresh samples per prompt (fixed seed)."""
    from fastllm.train.rollout import response_batch, sample_responses

    torch.manual_seed(123)
    batch = response_batch(sample_responses(policy, prompts * 4, max_new_tokens=max_new_tokens, eos_id=EOS),
                           max_new_tokens)
    return sum(gold_reward(None, batch.responses())) / len(batch.responses())


def next_token_dist(model) -> torch.Tensor:
    """The policy's distribution over the arms after the prompt [0] (float64)."""
    with torch.no_grad():
        return torch.softmax(model.logits(model(torch.tensor([[0]]))[0, -1]).double(), -1)


def bandit_policy(seed: int = 0):
    """(policy, pi_ref, pi_star): a 5-token tiny decoder whose next-token distribution after [0]
    is sharpened to be far from uniform and from pi* = pi_ref exp(R_ARMS / BETA) / Z."""
    policy = tiny_policy(seed, vocab=len(R_ARMS))
    with torch.no_grad():
        policy.model.norm.weight.mul_(4.0)
    pi_ref = next_token_dist(policy)
    return policy, pi_ref, torch.softmax(pi_ref.log() + R_ARMS / BETA, 0)


def arm_reward(prompts, responses):
    """The bandit's reward: R_ARMS of the one response token."""
    assert all(len(r) == 1 for r in responses)
    return [float(R_ARMS[r[0]]) for r in responses]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")


def split_worker_main(run) -> None:
    """The __main__ of a split worker (run under torchrun): run(aggregation) for every
    aggregation mode; rank 0 saves the results to argv[1]."""
    import os
    import sys

    results = {agg: run(agg) for agg in AGGREGATIONS}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, sys.argv[1])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def assert_split_update_matches(worker: str, tmp_path) -> None:
    """Run tests/train/<worker> on 1 and on 2 gloo processes (each rank its slice of the same
    rollout) and assert, for every aggregation, the same loss and updated weights, and that the
    weights moved (on row-invariant products: tests.conftest.row_invariant_products)."""
    import os
    import subprocess
    import sys

    import pytest

    from tests.conftest import row_invariant_products

    from .conftest import ROOT

    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}.pt"
        with row_invariant_products():  # the workers inherit FASTLLM_CPU_PRODUCTS
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "tests", "train", worker), str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        outs[nproc] = torch.load(out, weights_only=True)
    for agg, one in outs[1].items():
        two = outs[2][agg]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), agg
        moved = 0.0
        for k, v in one["weights"].items():
            torch.testing.assert_close(two["weights"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, agg=agg: f"{agg}: {m}")
            moved += float((v - one["initial"][k]).abs().sum())
        assert moved > 0, agg
