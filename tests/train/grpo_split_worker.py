"""Run under torchrun by tests/train/test_grpo.py: one GRPO iteration's update (2 passes, one
minibatch of 2 micro-batches per rank, KL term) on a fixed rollout of 4 groups of 4, each rank
taking whole groups, for each loss_type; rank 0 saves the losses and the weights. argv: output
file. Plain SGD, so the update is linear in the gradient (see ppo_split_worker.py)."""


import torch

from fastllm import models
from fastllm.train.common import build_scheduler
from fastllm.train.config import GRPOConfig
from fastllm.train.distributed import init_distributed, no_sync_fn, wrap_model
from fastllm.train.grpo import _TRAIN_STATS, collect_groups, grpo_loss_fns, grpo_update
from fastllm.train.rollout import PolicyLogProbs, policy_logprobs
from tests.train.rl_helpers import split_worker_main


def run(loss_type: str) -> dict:
    torch.manual_seed(0)
    policy = models.build_model(models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1))
    ref = models.build_model(models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1))
    cfg = GRPOConfig(batch_size=4, num_generations=4, grad_accum=2, num_iterations=2, max_new_tokens=5, beta=0.1,
                     lr=1e-2, loss_type=loss_type)
    lp = PolicyLogProbs(policy, cfg.temperature)
    initial = {k: v.clone() for k, v in lp.state_dict().items()}
    prompts = [[1, 3 + i % 5, 4 + i % 3][: 2 + i % 2] for i in range(4)]
    torch.manual_seed(1)  # every rank draws the same full rollout, then keeps its groups
    roll = collect_groups(lp, prompts, cfg, reference_logprobs=lambda b: policy_logprobs(ref, b, cfg.temperature)[0],
                          reward_model=None, reward_fn=lambda p, r: [0.2 * len(x) - 0.5 for x in r], eos_id=2,
                          pad_id=0)
    info, device = init_distributed("auto", torch.device("cpu"))
    per = 16 // info.world_size
    rows = {k: v[info.rank * per:(info.rank + 1) * per] for k, v in roll["rows"].items()}
    cfg = GRPOConfig(**{**cfg.__dict__, "batch_size": 4 // info.world_size})
    wrapped = wrap_model(lp, info, None, device)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, warmup_steps=0, max_steps=10, schedule="constant")
    stats = torch.zeros(len(_TRAIN_STATS), dtype=torch.float64)
    loss_sum, count_fn = grpo_loss_fns(cfg, wrapped, stats)
    res = grpo_update(rows, cfg, 0, wrapped, optimizer, scheduler, info, device=device, dtype=torch.float32,
                      loss_sum=loss_sum, count_fn=count_fn, no_sync=no_sync_fn(wrapped, info))
    return {"loss": res["loss"], "weights": {k: v.detach().clone() for k, v in lp.state_dict().items()},
            "initial": initial}


if __name__ == "__main__":
    split_worker_main(run)
