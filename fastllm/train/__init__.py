"""Training loops, one explicit function per method, and the plain functions they share.

    from fastllm.train import DPOConfig, PretrainConfig, SFTConfig, dpo, pretrain, sft
    pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))
    sft(SFTConfig(model="runs/out/final", peft={"method": "lora", "r": 8}))
    dpo(DPOConfig(model="runs/out/final", beta=0.1, loss_type="sigmoid"))
    reward(RewardConfig(model="runs/out/final", max_steps=200))    # then RewardScorer(model, tokenizer)

The same from the shell: `fastllm pretrain CONFIG.yaml key=value ...`, `fastllm sft ...`, `fastllm dpo ...`,
`fastllm reward ...`,
under `torchrun --nproc_per_node N` for DDP (default) or FSDP2 (distributed=fsdp).
"""

from .config import DPOConfig, PretrainConfig, RewardConfig, SFTConfig, TrainConfig, apply_overrides, load_config
from .dpo import dpo
from .pretrain import pretrain
from .reward import RewardScorer, reward
from .sft import sft

__all__ = ["DPOConfig", "PretrainConfig", "RewardConfig", "RewardScorer", "SFTConfig", "TrainConfig",
           "apply_overrides", "dpo", "load_config", "pretrain", "reward", "sft"]
