"""Prefix tuning (Li & Liang, 2021): P trainable key/value vectors per layer that every query
attends to, fed through the decoder's prefix-KV input (fastllm.ops.attention's prefix_k /
prefix_v). The prefixes carry no position; token positions still start at 0.

    prefixes: (L, 2, P, Hkv, D)            directly trained, or
    prefixes = MLP(E).view(L, 2, P, Hkv, D) with E: (P, hidden), MLP: hidden -> h -> L*2*Hkv*D
                                           (the reparametrisation the paper uses for stability)

After training, fold() evaluates the MLP once and keeps only the (L, 2, P, Hkv, D) table.

    model = PrefixTuningModel(base, num_virtual_tokens=10, reparam_hidden=256)
    hidden = model(input_ids);  logits = model.logits(hidden);  loss = model.loss(input_ids, labels)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastllm.models._decoder import NextTokenLoss

from .utils import mark_only_adapters_trainable


class PrefixEncoder(nn.Module):
    """Produces the (L, 2, P, Hkv, D) key/value prefixes."""

    peft_parameters = ("",)

    def __init__(self, num_layers: int, num_virtual_tokens: int, num_kv_heads: int, head_dim: int,
                 hidden_size: int, reparam_hidden: int | None = None, *, device=None, dtype=None):
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens: expected a positive integer, got {num_virtual_tokens}")
        self.shape = (num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim)
        numel = num_layers * 2 * num_kv_heads * head_dim
        if reparam_hidden is None:
            self.prefixes = nn.Parameter(torch.randn(self.shape, device=device, dtype=dtype))
            self.embedding = self.mlp = None
        else:
            self.prefixes = None
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden_size, device=device, dtype=dtype))
            self.mlp = nn.Sequential(nn.Linear(hidden_size, reparam_hidden, device=device, dtype=dtype), nn.Tanh(),
                                     nn.Linear(reparam_hidden, numel, device=device, dtype=dtype))

    def forward(self) -> Tensor:
        if self.mlp is None:
            return self.prefixes
        L, _, P, H, D = self.shape
        return self.mlp(self.embedding).view(P, L, 2, H, D).permute(1, 2, 0, 3, 4)  # (L, 2, P, Hkv, D)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparametrisation by the prefixes it produces (for inference and saving)."""
        if self.mlp is None:
            return
        self.prefixes = nn.Parameter(self().detach().clone().contiguous())
        self.embedding = self.mlp = None


class PrefixTuningModel(NextTokenLoss, nn.Module):
    """A frozen causal decoder with trainable key/value prefixes in every layer."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 10, reparam_hidden: int | None = None):
        super().__init__()
        cfg = model.config
        w = model.lm_head_weight
        self.model = model
        self.prefix = PrefixEncoder(cfg.num_hidden_layers, num_virtual_tokens, cfg.num_key_value_heads, cfg.head_dim,
                                    cfg.hidden_size, reparam_hidden, device=w.device, dtype=w.dtype)
        self.peft_type = "FASTLLM_PREFIX_TUNING"
        self.peft_settings = {"num_virtual_tokens": num_virtual_tokens, "reparam_hidden": reparam_hidden}
        mark_only_adapters_trainable(self)

    def prefix_kv(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """One (k, v) per layer, each (batch, P, Hkv, D)."""
        kv = self.prefix()
        return [(kv[i, 0].expand(batch, *kv.shape[2:]), kv[i, 1].expand(batch, *kv.shape[2:]))
                for i in range(kv.shape[0])]

    def forward(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Hidden states (B, T, hidden); kwargs (attention_mask, position_ids) go to the model."""
        return self.model(input_ids, prefix_kv=self.prefix_kv(input_ids.shape[0]), **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.lm_head_weight

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits(hidden)


    def fold(self) -> None:
        self.prefix.fold()
        self.peft_settings["reparam_hidden"] = None
