"""Which parameters are adapters: selection, freezing, counting, and the adapter-only state dict.

A PEFT module names its adapter parameters by local prefix in the class attribute
`peft_parameters` (LoRALinear: ("lora_A", "lora_B"); a bottleneck adapter, a prefix or a
soft prompt: ("",), all of its parameters). Everything else in the model is base weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Full names (as in model.named_parameters()) of every adapter parameter."""
    names = set()
    for mod_name, module in model.named_modules():
        prefixes = getattr(type(module), "peft_parameters", None)
        if prefixes is None:
            continue
        for p_name, _ in module.named_parameters():
            if any(pre == "" or p_name == pre or p_name.startswith(pre + ".") for pre in prefixes):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """requires_grad=True for adapter parameters, False for every base parameter."""
    adapters = adapter_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in adapters)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to hand to the optimizer: adapters only."""
    adapters = adapter_parameter_names(model)
    return [p for n, p in model.named_parameters() if n in adapters]


@dataclass
class TrainableParameters:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count of parameters that require grad, of all parameters, and the percentage."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return TrainableParameters(trainable, total)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters alone, keyed by their names in the model."""
    adapters = adapter_parameter_names(model)
    return {n: p.detach() for n, p in model.named_parameters() if n in adapters}
