"""Bottleneck adapters: a small residual MLP after a sub-layer's output projection.

    adapter(h) = h + up(act(down(h))),   down: hidden -> hidden / reduction_factor, up: back

Houlsby et al. (2019) put one after the attention output and one after the MLP of every
layer; Pfeiffer et al. (2020) only after the MLP. `up` starts at zero, so every adapter is
the identity at initialisation and the adapted model equals the base model.

The swap is explicit: the targeted nn.Linear (o_proj, down_proj in the Llama family) becomes
an AdaptedLinear that keeps its frozen weight and bias under the same names and applies the
adapter to the linear's output, i.e. before the block's residual add, where Houlsby places it.

    apply_adapters(model, kind="houlsby", reduction_factor=16, nonlinearity="relu")
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


class BottleneckAdapter(nn.Module):
    """h (..., hidden) -> h + up(act(down(h))); the identity at initialisation."""

    peft_parameters = ("",)  # every parameter is an adapter parameter

    def __init__(self, hidden_size: int, reduction_factor: float = 16, nonlinearity: str = "relu", *,
                 device=None, dtype=None):
        super().__init__()
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity: expected one of {list(ACTIVATIONS)}, got {nonlinearity!r}")
        if not reduction_factor > 0:
            raise ValueError(f"reduction_factor: expected a positive value, got {reduction_factor}")
        bottleneck = max(1, int(hidden_size // reduction_factor))
        self.down = nn.Linear(hidden_size, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, hidden_size, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)
        self.disabled = False

    def forward(self, h: Tensor) -> Tensor:
        if self.disabled:
            return h
        return h + self.up(self.act(self.down(h)))


class AdaptedLinear(nn.Module):
    """A frozen linear followed by a BottleneckAdapter: adapter(x W^T + b)."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def apply_adapters(model: nn.Module, kind: str = "houlsby", reduction_factor: float = 16,
                   nonlinearity: str = "relu", *, attn_output: str = "self_attn.o_proj",
                   mlp_output: str = "mlp.down_proj") -> list[str]:
    """Insert bottleneck adapters (kind "houlsby" or "pfeiffer") after every layer's attention
    output projection and/or MLP output projection (names for the Llama family by default),
    then freeze everything but adapter parameters. Returns the adapted module names."""
    if kind not in PLACEMENTS:
        raise ValueError(f"kind: expected one of {list(PLACEMENTS)}, got {kind!r}")
    suffixes = [{"attn": attn_output, "mlp": mlp_output}[p] for p in PLACEMENTS[kind]]
    adapted = []
    for name, module in list(model.named_modules()):
        if not any(name.endswith("." + s) for s in suffixes):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to adapt, got {type(module).__name__}")
        w = module.weight
        adapter = BottleneckAdapter(module.out_features, reduction_factor, nonlinearity, device=w.device,
                                    dtype=w.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, AdaptedLinear(module, adapter))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"attn_output, mlp_output: no module of the model ends with {suffixes}")
    model.peft_type = "FASTLLM_BOTTLENECK"
    model.peft_settings = {"kind": kind, "reduction_factor": reduction_factor, "nonlinearity": nonlinearity,
                           "attn_output": attn_output, "mlp_output": mlp_output}
    from .utils import mark_only_adapters_trainable

    mark_only_adapters_trainable(model)
    return adapted
