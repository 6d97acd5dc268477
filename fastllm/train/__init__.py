"""Training loops, one explicit function per method, and the plain functions they share.

    from fastllm.train import DPOConfig, PretrainConfig, SFTConfig, dpo, pretrain, sft
    pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))
    sft(SFTConfig(model="runs/out/final", peft={"method": "lora", "r": 8}))
    dpo(DPOConfig(model="runs/out/final", beta=0.1, loss_type="sigmoid"))
    ppo(PPOConfig(model="runs/out/final", reward_model="runs/reward/final", kl_coef=0.05))

The same from the shell: `fastllm pretrain CONFIG.yaml key=value ...`, `fastllm sft ...`, `fastllm dpo ...`,
`fastllm ppo ...`, under `torchrun --nproc_per_node N` for DDP (default) or FSDP2 (distributed=fsdp).
"""

from .config import DPOConfig, PPOConfig, PretrainConfig, SFTConfig, TrainConfig, apply_overrides, load_config
from .dpo import dpo
from .ppo import ppo
from .pretrain import pretrain
from .sft import sft

__all__ = ["DPOConfig", "PPOConfig", "PretrainConfig", "SFTConfig", "TrainConfig", "apply_overrides", "dpo",
           "load_config", "ppo", "pretrain", "sft"]
