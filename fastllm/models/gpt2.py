"""GPT-2 (Radford et al., 2019): learned positions, pre-LayerNorm blocks, GELU (tanh form)
MLP, output head tied to the token embeddings.

    x0 = wte(ids) + wpe(pos)
    block(x) = h + mlp(ln_2(h)),  h = x + attn(ln_1(x))
    hidden = ln_f(x_L);  logits = hidden @ wte.weight^T

Module names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h[i].attn.c_attn,
...). Hugging Face stores c_attn/c_proj/c_fc as Conv1D weights of shape (in, out); here they
are nn.Linear (out, in) and are transposed on load and save. Attention goes through
fastllm.ops.attention, with the same forward arguments as the Llama decoder.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastllm.ops import small_linear

from . import _decoder
from .config import GPT2Config
from .kv_cache import KVCache
from .registry import HFNames

_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, step: _decoder.Step) -> Tensor:
        B, T, C = x.shape
        q, k, v = (
            _decoder.linear(self, "c_attn", x, step).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        )  # each (B, T, H, D)
        out = _decoder.self_attention(q, k, v, self.layer_idx, step)  # (B, T, H, D)
        return _decoder.linear(self, "c_proj", out.reshape(B, T, C), step)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x: Tensor, step: _decoder.Step | None = None) -> Tensor:
        h = F.gelu(_decoder.linear(self, "c_fc", x, step), approximate="tanh")
        return _decoder.linear(self, "c_proj", h, step)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, step: _decoder.Step) -> Tensor:
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x), step)


class GPT2Model(nn.Module):
    """Embeddings, blocks and final LayerNorm (Hugging Face's `transformer.` prefix)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(_decoder.NextTokenLoss, HFNames, nn.Module):
    """GPT-2 with its tied output head. Same calling convention as LlamaForCausalLM:
    forward -> final hidden states, logits(hidden), lm_head_weight, loss(input_ids, labels)."""

    # causal-mask buffers kept by older checkpoints, and the tied head (checked in _from_hf)
    _ignored_hf = (r"\.attn\.bias$", r"\.attn\.masked_bias$")

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.activation_checkpointing = False  # recompute each block in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: Normal(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / (2 * self.config.n_layer) ** 0.5)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def lm_head_weight(self) -> Tensor:
        """The (V, hidden) output projection: the token embeddings (tied)."""
        return self.transformer.wte.weight

    def new_kv_cache(self, batch: int, max_len: int, dtype=None, device=None, backend: str = "auto") -> KVCache:
        w = self.transformer.wte.weight
        cfg = self.config
        return KVCache(
            cfg.n_layer,
            batch,
            max_len,
            cfg.n_head,
            cfg.n_embd // cfg.n_head,
            dtype=dtype or w.dtype,
            device=device or w.device,
            backend=backend,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        prefix_kv: list[tuple[Tensor, Tensor]] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Hidden states after ln_f: (B, T, n_embd). Arguments as LlamaForCausalLM.forward;
        inputs_embeds are token embeddings (position embeddings are still added)."""
        cfg = self.config
        input_ids, step = _decoder.prepare(
            cfg,
            input_ids,
            inputs_embeds,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            attention_mask=attention_mask,
            prefix_kv=prefix_kv,
            kv_cache=kv_cache,
            max_positions=cfg.n_positions,
        )
        return self._run(input_ids, inputs_embeds, step)

    def decode(self, tokens: Tensor, positions: Tensor, kv_cache: KVCache) -> Tensor:
        """The decode step through this same forward, as LlamaForCausalLM.decode: hidden
        (B, n_embd) for tokens (B,) at positions (B,); k/v written at those cache slots."""
        step = _decoder.decode_step(self.config, tokens, positions, kv_cache)
        return self._run(tokens.unsqueeze(1), None, step).squeeze(1)

    def _run(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, step: _decoder.Step) -> Tensor:
        tok = self.transformer.wte(input_ids) if input_ids is not None else inputs_embeds
        x = tok + self.transformer.wpe(step.position_ids)  # (B, T, C)
        x = _decoder.run_blocks(self.transformer.h, x, step, checkpoint=self.activation_checkpointing)
        _decoder.finish(step)
        return self.transformer.ln_f(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return small_linear(hidden, self.lm_head_weight)  # F.linear; few rows: the native CPU kernel

    # -- Hugging Face names: optional `transformer.` prefix, Conv1D (in, out) weights ------
    @classmethod
    def _from_hf(cls, name, tensor, raw, config):
        if name == "lm_head.weight":
            wte = raw.get("transformer.wte.weight", raw.get("wte.weight"))
            if wte is not None and not torch.equal(wte, tensor):
                raise ValueError(
                    "lm_head.weight: GPT-2's head is tied to wte.weight, "
                    "but the checkpoint's differs"
                )
            return None
        if not name.startswith("transformer."):
            name = "transformer." + name
        if _CONV1D.search(name) and tensor.dim() == 2:
            tensor = tensor.t()
        return name, tensor

    @classmethod
    def _to_hf(cls, name, tensor):
        if _CONV1D.search(name):
            tensor = tensor.t().contiguous()
        return name, tensor
