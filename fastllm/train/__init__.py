"""Training loops, one explicit function per method, and the plain functions they share.

    from fastllm.train import PretrainConfig, SFTConfig, pretrain, sft
    pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))
    sft(SFTConfig(model="runs/out/final", peft={"method": "lora", "r": 8}))

The same from the shell: `fastllm pretrain CONFIG.yaml key=value ...`, `fastllm sft ...`,
under `torchrun --nproc_per_node N` for DDP (default) or FSDP2 (distributed=fsdp).
"""

from .config import PretrainConfig, SFTConfig, TrainConfig, apply_overrides, load_config
from .pretrain import pretrain
from .sft import sft

__all__ = ["PretrainConfig", "SFTConfig", "TrainConfig", "apply_overrides", "load_config", "pretrain", "sft"]
