"""Parameter-efficient fine-tuning on fastllm models, by explicit module swaps.

    from fastllm import peft
    peft.apply_lora(model, target_modules=["q_proj", "v_proj"], r=8, alpha=16)
    print(peft.trainable_parameters(model))
    opt = torch.optim.AdamW(peft.adapter_parameters(model), lr=1e-3)
    peft.save_adapter(model, "out/adapter")          # PEFT's adapter_config.json + safetensors
    peft.load_adapter(fresh_model, "out/adapter")     # also loads adapters trained with PEFT
"""

from .io import load_adapter, read_adapter_config, save_adapter
from .lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    delete_adapter,
    disable_adapters,
    lora_modules,
    merge_lora,
    set_adapter,
    unmerge_lora,
)
from .utils import (
    TrainableParameters,
    adapter_parameter_names,
    adapter_parameters,
    adapter_state_dict,
    mark_only_adapters_trainable,
    trainable_parameters,
)

__all__ = [
    "LoraConfig", "LoRALinear", "apply_lora", "delete_adapter", "disable_adapters", "lora_modules", "merge_lora",
    "set_adapter", "unmerge_lora", "load_adapter", "read_adapter_config", "save_adapter", "TrainableParameters",
    "adapter_parameter_names", "adapter_parameters", "adapter_state_dict", "mark_only_adapters_trainable",
    "trainable_parameters",
]
