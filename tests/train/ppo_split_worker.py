"""Run under torchrun by tests/train/test_ppo.py: one PPO update (2 epochs, one minibatch of 2
micro-batches per rank) on a fixed rollout of 8 rows, each rank taking its slice, for each loss
aggregation; rank 0 saves the losses and the weights. argv: output file.

The optimizer is plain SGD: the update is then linear in the gradient, so the comparison
measures the PPO step itself (Adam's m / sqrt(v) turns the last-bit differences of the
summation order in a near-zero gradient into full-size steps)."""


import torch

from fastllm import models
from fastllm.train.common import build_scheduler
from fastllm.train.config import PPOConfig
from fastllm.train.distributed import DistInfo, init_distributed, no_sync_fn, wrap_model
from fastllm.train.ppo import _TRAIN_STATS, ActorCritic, build_critic, collect_rollout, ppo_loss_fns, ppo_update
from tests.train.rl_helpers import split_worker_main


def run(aggregation: str) -> dict:
    torch.manual_seed(0)
    policy = models.build_model(models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1))
    ref = models.build_model(models.preset("tiny-llama", vocab_size=12, num_hidden_layers=1))
    cfg = PPOConfig(batch_size=8, grad_accum=2, ppo_epochs=2, max_new_tokens=5, kl_coef=0.1, lr=1e-2,
                    loss_aggregation=aggregation, entropy_coef=0.01, kl_penalty="loss", kl_estimator="k3")
    ac = ActorCritic(policy, temperature=cfg.temperature, **build_critic(policy, None, "separate"))
    initial = {k: v.clone() for k, v in ac.state_dict().items()}
    prompts = [[1, 3 + i % 5, 4 + i % 3][: 2 + i % 2] for i in range(8)]
    torch.manual_seed(1)  # every rank draws the same full rollout, then keeps its slice

    def ref_logp(batch):
        from fastllm.train.rollout import policy_logprobs

        return policy_logprobs(ref, batch, cfg.temperature)[0]

    roll = collect_rollout(ac, prompts, cfg, reference_logprobs=ref_logp, reward_model=None,
                           reward_fn=lambda p, r: [0.2 * len(x) - 0.5 for x in r], eos_id=2, pad_id=0,
                           kl_coef=0.1, info=DistInfo())
    info, device = init_distributed("auto", torch.device("cpu"))
    per = 8 // info.world_size
    rows = {k: v[info.rank * per:(info.rank + 1) * per] for k, v in roll["rows"].items()}
    cfg = PPOConfig(**{**cfg.__dict__, "batch_size": per})
    wrapped = wrap_model(ac, info, None, device)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, warmup_steps=0, max_steps=10, schedule="constant")
    stats = torch.zeros(len(_TRAIN_STATS), dtype=torch.float64)
    loss_sum, count_fn = ppo_loss_fns(cfg, wrapped, lambda: 0.1, stats)
    res = ppo_update(rows, cfg, 0, wrapped, optimizer, scheduler, info, device=device, dtype=torch.float32,
                     loss_sum=loss_sum, count_fn=count_fn, no_sync=no_sync_fn(wrapped, info))
    return {"loss": res["loss"], "weights": {k: v.detach().clone() for k, v in ac.state_dict().items()},
            "initial": initial}


if __name__ == "__main__":
    split_worker_main(run)
