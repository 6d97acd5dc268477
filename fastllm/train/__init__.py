"""Training loops, one explicit function per method, and the plain functions they share.

    from fastllm.train import DPOConfig, FinetuneConfig, PretrainConfig, SFTConfig, dpo, finetune, pretrain, sft
    pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))
    sft(SFTConfig(model="runs/out/final", peft={"method": "lora", "r": 8}))
    dpo(DPOConfig(model="runs/out/final", beta=0.1, loss_type="sigmoid"))
    reward(RewardConfig(model="runs/out/final", max_steps=200))    # then RewardScorer(model, tokenizer)
    ppo(PPOConfig(model="runs/out/final", reward_model="runs/reward/final", kl_coef=0.05))
    grpo(GRPOConfig(model="runs/out/final", reward_funcs=["my_rewards:correct"], num_generations=8))
    finetune(FinetuneConfig(task="classification", data="topics", model="runs/out/final"))

The same from the shell: `fastllm pretrain CONFIG.yaml key=value ...`, `fastllm sft ...`, `fastllm dpo ...`,
`fastllm reward ...`, `fastllm ppo ...`, `fastllm grpo ...`, `fastllm finetune ...`,
under `torchrun --nproc_per_node N` for DDP (default) or FSDP2 (distributed=fsdp).
"""

from .config import (
    DPOConfig,
    FinetuneConfig,
    GRPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from .dpo import dpo
from .finetune import finetune
from .grpo import grpo
from .ppo import ppo
from .pretrain import pretrain
from .reward import RewardScorer, reward
from .sft import sft

__all__ = ["DPOConfig", "FinetuneConfig", "GRPOConfig", "PPOConfig", "PretrainConfig", "RewardConfig", "RewardScorer",
           "SFTConfig", "TrainConfig", "apply_overrides", "dpo", "finetune", "grpo", "load_config", "ppo", "pretrain",
           "reward", "sft"]
