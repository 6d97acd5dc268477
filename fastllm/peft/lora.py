"""LoRA (Hu et al., 2021) as an explicit module swap: every targeted nn.Linear becomes a
LoRALinear that keeps the frozen weight and bias under their old names (so base state-dict
keys do not change) and adds named low-rank adapters:

    y = x W^T + b + s * (dropout(x) A^T) B^T,   A: (r, in), B: (out, r),
    s = alpha / r   (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

The forward runs the fused op fastllm.ops.lora_linear (no dW, no dense B A, no (rows, out)
LoRA branch). Several adapters may live in one module; one is active at a time.

    names = apply_lora(model, target_modules=["q_proj", "v_proj"], r=8, alpha=16)
    apply_lora(model, target_modules=[...], r=4, adapter_name="other")   # a second adapter
    set_adapter(model, "other");  with disable_adapters(model): ...;  delete_adapter(model, "other")
    merge_lora(model);  unmerge_lora(model)

Merge round trip (merge then unmerge; W + s B A is formed in float32 and rounded once each
way, so the error is about one rounding of the merged weight). Measured max |W' - W| relative
to max |W + s B A| on the tiny Llama, r=8, all linears (tests/peft/test_lora.py bounds it at
about twice these):
    float64 1e-16,  float32 1.1e-7 (~2^-23),  float16 4.6e-4 (~2^-11),  bfloat16 3.6e-3 (~2^-8).
So unmerge restores float32/float64 weights up to rounding but not bf16/fp16 bit for bit:
keep a copy of the base weights where that matters.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastllm.ops.lora_linear import lora_linear

INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """One adapter's settings (the fields PEFT's adapter_config.json holds)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    init: bool | str = True

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha == 0:
            raise ValueError(f"alpha: expected a finite non-zero number (the adapter output is scaled by alpha / r, "
                             f"so 0 would train nothing), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, (str, list, tuple)) or (
                not isinstance(self.target_modules, str) and not all(isinstance(t, str) for t in self.target_modules)):
            raise ValueError(f"target_modules: expected module-name suffixes (a list of strings), a regular expression "
                             f"or 'all-linear', got {self.target_modules!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init: expected one of {INIT_CHOICES}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen linear (weight (out, in), bias (out,) or None) plus named LoRA adapters.

    lora_A[name]: (r, in), lora_B[name]: (out, r). `active_adapter` picks the one used;
    `disabled` runs the base linear alone; `merged` names the adapter folded into weight.
    """

    peft_parameters = ("lora_A", "lora_B")  # local parameter prefixes that belong to adapters

    def __init__(self, base: nn.Linear, *, backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.configs: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged: str | None = None
        self.backend = backend

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if name in self.configs:
            raise ValueError(f"adapter_name: {name!r} already exists in this module")
        w = self.weight
        a = torch.empty(config.r, self.in_features, device=w.device, dtype=w.dtype)
        b = torch.zeros(self.out_features, config.r, device=w.device, dtype=w.dtype)
        if config.init == "gaussian":
            nn.init.normal_(a, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does
        if config.init is False:  # a non-identity start, for tests of the low-rank path
            nn.init.normal_(b, std=1.0 / config.r)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.configs[name] = config
        if self.active_adapter is None:  # a lone module uses its first adapter; apply_lora re-syncs
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if self.merged == name:
            raise RuntimeError(f"adapter_name: {name!r} is merged into the weight; unmerge it before deleting")
        del self.lora_A[name], self.lora_B[name], self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"adapter_name: expected one of {list(self.configs)}, got {name!r}")

    def delta_weight(self, name: str) -> Tensor:
        """s * B A (out, in) in float32 (float64 for float64): only for merging, never in training."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.configs[name].scaling * (self.lora_B[name].to(acc) @ self.lora_A[name].to(acc))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged is not None or self.active_adapter is None:
            return
        name = self.active_adapter
        delta = self.delta_weight(name)
        self.weight.copy_(self.weight.to(delta.dtype) + delta)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        delta = self.delta_weight(self.merged)
        self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self.merged = None

    def _live_adapter(self) -> str | None:
        """The adapter whose low-rank term the forward adds, or None where the forward is the base
        linear alone (no adapter, disabled, merged: the update is already in weight)."""
        name = self.active_adapter
        return None if name is None or self.disabled or self.merged is not None else name

    def _drops(self, name: str) -> bool:
        """Whether the forward applies the adapter's dropout (training mode, dropout > 0)."""
        return self.training and self.configs[name].dropout > 0

    def forward(self, x: Tensor) -> Tensor:
        name = self._live_adapter()
        if name is None:
            if self.disabled and self.merged is not None:
                raise RuntimeError("disable_adapters: the adapter is merged into the weight; unmerge first")
            return F.linear(x, self.weight, self.bias)
        cfg = self.configs[name]
        keep = None
        if self._drops(name):
            keep = torch.rand(x.shape, device=x.device) >= cfg.dropout
        a, b = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        return lora_linear(x, self.weight, self.bias, a, b, cfg.scaling, keep=keep,
                           dropout_p=cfg.dropout if keep is not None else 0.0, backend=self.backend)

    def group_parts(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor, float, str | None] | None:
        """This module's forward as one part of fastllm.ops.lora_linear_group (several projections
        on the same input in one op: the models' q/k/v and gate/up): (weight, bias, A, B, scale,
        backend) of the active adapter; None where the forward is something else (no adapter,
        disabled, merged, dropout in training)."""
        name = self._live_adapter()
        if name is None or self._drops(name):
            return None
        return self.weight, self.bias, self.lora_A[name], self.lora_B[name], self.configs[name].scaling, self.backend

    def inference_parts(self) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None] | None:
        """What an inference forward (no gradients) computes, for callers that fuse several
        projections into one matmul (the models' KVCache.fused_projection): (weight, bias,
        low_rank) with y = x weight^T + bias + (x A^T) (s B)^T, low_rank = (A (r, in), s B (out, r))
        of the active adapter, or None when the base linear alone is the output (no adapter,
        disabled, merged). None in training mode with dropout (the forward is then random)."""
        name = self._live_adapter()
        if name is None:
            return self.weight, self.bias, None
        if self._drops(name):
            return None
        return self.weight, self.bias, (self.lora_A[name], self.configs[name].scaling * self.lora_B[name].detach())

    def inference_state(self) -> tuple:
        """The settings besides tensor contents that decide inference_parts()."""
        return (self.active_adapter, self.disabled, self.merged, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={ {n: c.r for n, c in self.configs.items()} }, active={self.active_adapter!r}")


# --------------------------------------------------------------------------- model-level functions


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, target_modules=("q_proj", "v_proj"), r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, use_rslora: bool = False, init: bool | str = True, *,
               adapter_name: str = "default", backend: str | None = None) -> list[str]:
    """Swap every nn.Linear whose name matches `target_modules` for a LoRALinear (or add
    `adapter_name` to an existing LoRALinear), then freeze everything but adapter parameters.

    target_modules: module-name suffixes (["q_proj", "v_proj"]), a regular expression that
    must match the whole module name, or "all-linear" (every linear except the output head).
    Returns the names of the adapted modules; the config is kept in model.peft_config.
    """
    config = LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                        use_rslora=use_rslora, init=init)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter_name: {adapter_name!r} already exists on this model")
    adapted = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, target_modules):
            continue
        if target_modules == "all-linear" and name.split(".")[-1] in ("lm_head", "score", "classifier"):
            continue
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = LoRALinear(module, backend=backend)
            setattr(parent, child, module)
        elif not isinstance(module, LoRALinear):
            continue
        module.add_adapter(adapter_name, config)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"target_modules: no nn.Linear in the model matches {target_modules!r}")
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    # The model's active adapter stays active; the first one added becomes it.
    active = getattr(model, "active_adapter", None) or adapter_name
    set_adapter(model, active)
    from .utils import mark_only_adapters_trainable

    mark_only_adapters_trainable(model)
    return adapted


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter of every LoRALinear that has it."""
    mods = lora_modules(model)
    if not any(adapter_name in m.configs for m in mods.values()):
        raise KeyError(f"adapter_name: expected one of {list(getattr(model, 'peft_config', {}))}, got {adapter_name!r}")
    for m in mods.values():
        if m.merged is not None and m.merged != adapter_name:
            raise RuntimeError(f"set_adapter: adapter {m.merged!r} is merged; unmerge it before switching")
    for m in mods.values():
        m.active_adapter = adapter_name if adapter_name in m.configs else None
    model.active_adapter = adapter_name


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (LoRA and bottleneck adapters)."""
    mods = [m for m in model.modules() if hasattr(m, "disabled")]
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, p in zip(mods, previous, strict=True):
            m.disabled = p


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name` everywhere; a LoRALinear left without adapters stays a plain
    pass-through to its frozen weight."""
    found = False
    for m in lora_modules(model).values():
        if adapter_name in m.configs:
            m.delete_adapter(adapter_name)
            found = True
    if not found:
        raise KeyError(f"adapter_name: expected one of {list(getattr(model, 'peft_config', {}))}, got {adapter_name!r}")
    getattr(model, "peft_config", {}).pop(adapter_name, None)
    if getattr(model, "active_adapter", None) == adapter_name:
        model.active_adapter = None
        if model.peft_config:
            set_adapter(model, next(iter(model.peft_config)))


def merge_lora(model: nn.Module) -> None:
    """Fold each module's active adapter into its weight: W <- W + s B A."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W <- W - s B A (see the module docstring for the round-trip error)."""
    for m in lora_modules(model).values():
        m.unmerge()
