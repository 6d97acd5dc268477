"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): pre-RMSNorm blocks, RoPE,
grouped-query attention, SwiGLU MLP, tied or untied embeddings, optional q/k/v biases.

Module names follow Hugging Face's LlamaForCausalLM, so state dicts map 1:1 and LoRA
targets read as usual:

    model.embed_tokens, model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head (absent when tied)

    block(x) = h + mlp(post_attention_layernorm(h)),  h = x + self_attn(input_layernorm(x))
    mlp(x)   = down_proj(silu(gate_proj(x)) * up_proj(x))

Every attention call goes through fastllm.ops.attention, RoPE through fastllm.ops.apply_rope
(q and k in one call), the MLP gate through fastllm.ops.swiglu, the norms through
fastllm.ops.rms_norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastllm.ops import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, small_linear, swiglu

from . import _decoder
from .config import LlamaConfig
from .kv_cache import KVCache
from .registry import HFNames


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE: Hq query heads share Hkv key/value heads."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        H, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=config.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: _decoder.Step) -> Tensor:
        B, T, _ = x.shape
        q, k, v = _decoder.project(self, ("q_proj", "k_proj", "v_proj"), x, step)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, Hq, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if step.decode is None:
            q, k = apply_rope(q, k, cos, sin)
        # (decode step: RoPE at each sequence's position is fused with the cache append)
        out = _decoder.self_attention(q, k, v, self.layer_idx, step)  # (B, T, Hq, D)
        return _decoder.linear(self, "o_proj", out.reshape(B, T, self.n_heads * self.head_dim), step)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, Inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, Inter, bias=config.mlp_bias)
        self.up_proj = nn.Linear(H, Inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(Inter, H, bias=config.mlp_bias)

    def forward(self, x: Tensor, step: _decoder.Step | None = None) -> Tensor:
        gate, up = _decoder.project(self, ("gate_proj", "up_proj"), x, step)
        # training keeps gate and up (SwiGLU's backward needs them), not their product: the
        # down projection's saved input is recomputed from them (one intermediate-sized
        # activation per layer less at the backward's peak)
        return _decoder.recompute_saved(_decoder.swiglu_act(gate, up, step), lambda: swiglu(gate, up),
                                        lambda h: _decoder.linear(self, "down_proj", h, step), step)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: _decoder.Step) -> Tensor:
        if step.decode is not None and x.dtype == torch.float32:
            args = self.decode_args(step.kv_cache)
            if args is not None:  # this block's decode step in one native call
                return _decoder.decode_in_one_call(step.kv_cache.kernels.decode_layer, x, [args], step)
        # each norm's output is recomputed from its input (kept by the norm's backward) where
        # the projections' backward needs it, instead of kept
        x = x + _decoder.recompute_saved(_decoder.norm(self.input_layernorm, x, step),
                                         lambda x=x: self.input_layernorm(x),
                                         lambda h: self.self_attn(h, cos, sin, step), step)
        return x + _decoder.recompute_saved(_decoder.norm(self.post_attention_layernorm, x, step),
                                            lambda x=x: self.post_attention_layernorm(x),
                                            lambda h: self.mlp(h, step), step)

    def decode_args(self, cache: KVCache) -> tuple[tuple, float] | None:
        """The arguments of this block's decode step as one native call (fastllm.ops.decode_layer:
        the same kernels as the per-op branch of `forward`, in its order, so the same result bit
        for bit) other than the step's input and positions: (the block's weights and its layer's
        caches, the attention scale); None where that call does not apply: no native kernel, an
        attention or MLP module replaced by another class or carrying forward hooks (the per-op
        branch calls those modules, so their hooks run), a projection that is not a plain or
        LoRA-merged linear (LoRA as a low-rank term, another wrapper), or a tensor that is not
        float32."""
        attn, mlp = self.self_attn, self.mlp
        if (cache.kernels.decode_layer is None or type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP
                or _decoder.has_forward_hooks(attn, mlp)):
            return None
        parts = (cache.fused_projection(attn, ("q_proj", "k_proj", "v_proj")),
                 cache.fused_projection(attn, ("o_proj",)),
                 cache.fused_projection(mlp, ("gate_proj", "up_proj")),
                 cache.fused_projection(mlp, ("down_proj",)))
        for p in parts:
            if p is None or p[2] is not None:
                return None
            for w in p[0] if isinstance(p[0], tuple) else (p[0],):  # a group's weight, or its parts
                if w.dtype != torch.float32 or w.stride(-1) != 1:
                    return None
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if n1.weight.dtype != torch.float32 or n2.weight.dtype != torch.float32:
            return None
        (qkv, b_qkv, _, _), (o, b_o, _, _), (gu, b_gu, _, _), (down, b_down, _, _) = parts
        qkv, gu = (list(w) if isinstance(w, tuple) else [w] for w in (qkv, gu))
        i = attn.layer_idx
        return ((n1.weight, n1.eps, qkv, b_qkv, o, b_o, n2.weight, n2.eps, gu, b_gu, down, b_down, cache.layer_k[i],
                 cache.layer_v[i]), 1.0 / math.sqrt(attn.head_dim))


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._inv_freq: dict[torch.device, Tensor] = {}  # per device; not a buffer (never saved)

    def inv_freq(self, device: torch.device) -> Tensor:
        """RoPE inverse frequencies (head_dim/2,) float32, with the config's scaling."""
        if device not in self._inv_freq:
            cfg = self.config
            self._inv_freq[device] = rope_inv_freq(
                cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
            ).to(device)
        return self._inv_freq[device]


class LlamaForCausalLM(_decoder.NextTokenLoss, HFNames, nn.Module):
    """The decoder plus output head. forward returns the final-normed hidden states; the
    head is applied by `logits()` or folded into `loss()` (see forward's docstring)."""

    _ignored_hf = (r"rotary_emb\.inv_freq$",)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.activation_checkpointing = False  # recompute each block in the backward pass
        # recompute the norm outputs and the SwiGLU product in the backward (_decoder.recompute_saved):
        # ~30% less activation memory for ~5% more step time on the CPU; False keeps them
        self.recompute_activations = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases and
        unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @classmethod
    def _from_hf(cls, name, tensor, raw, config):
        # Some tied checkpoints also store the head: accept it only as a copy of the embeddings.
        if name == "lm_head.weight" and config.tie_word_embeddings:
            emb = raw.get("model.embed_tokens.weight")
            if emb is not None and not torch.equal(tensor, emb):
                raise ValueError(
                    "lm_head.weight: config.json ties it to model.embed_tokens.weight, "
                    "but the checkpoint's differs"
                )
            return None
        return name, tensor

    @property
    def lm_head_weight(self) -> Tensor:
        """The (V, hidden) output projection: lm_head.weight, or the embeddings when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_kv_cache(self, batch: int, max_len: int, dtype=None, device=None, backend: str = "auto") -> KVCache:
        """An empty KVCache sized for this model (backend: the decode kernels', see KVCache)."""
        w = self.model.embed_tokens.weight
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers,
            batch,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
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
        """Hidden states after the final norm: (B, T, hidden).

        input_ids: (B, T) token ids in [0, vocab_size); or packed (1, N) / (N,) with
            cu_seqlens (num_seqs+1,) int32 offsets (each sequence attends only to itself and
            its positions restart at 0). Exactly one of input_ids / inputs_embeds (B, T, hidden).
        position_ids: (B, T); default 0..T-1, the packed restart, or continuing a kv_cache.
        attention_mask: (B, T), 1 for real tokens, 0 for padding (keys masked out).
        prefix_kv: one (k, v) per layer, each (B, P, Hkv, D): P extra keys every query sees
            (prefix tuning); they carry no position, and token positions still start at 0.
        kv_cache: a KVCache (see new_kv_cache); new keys/values are appended and attended
            to, its lengths advance by the real new tokens (attention_mask rows must then be
            right-padded).
        """
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
            max_positions=cfg.max_position_embeddings,
            window=cfg.sliding_window,
        )
        return self._run(input_ids, inputs_embeds, step)

    def decode(self, tokens: Tensor, positions: Tensor, kv_cache: KVCache) -> Tensor:
        """The decode step through this same forward: hidden states (B, hidden) after the final
        norm for one new token per sequence, tokens (B,) at positions (B,) int32 (each
        sequence's own: ragged prompts). Its key/value is written at slot positions[b] of
        kv_cache and it attends to slots 0..positions[b]; the cache lengths become
        positions + 1. No value checks and no host sync (CUDA-graph capturable); inference
        only (the fused decode kernels have no autograd)."""
        step = _decoder.decode_step(self.config, tokens, positions, kv_cache)
        step.decode.inv_freq = self.model.inv_freq(tokens.device)
        return self._run(tokens.unsqueeze(1), None, step).squeeze(1)

    def _run(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, step: _decoder.Step) -> Tensor:
        x = (
            self.model.embed_tokens(input_ids) if input_ids is not None else inputs_embeds
        )  # (B, T, H)
        cos = sin = None  # a decode step rotates inside kv_append_rope
        if step.decode is None:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            # cos/sin once per forward, shared by every layer: (B, T, D/2)
            cos, sin = rope_cos_sin(self.model.inv_freq(x.device), step.position_ids, acc)
        step.recompute = self.recompute_activations and not self.activation_checkpointing
        x = _decoder.run_blocks(self.model.layers, x, cos, sin, step, checkpoint=self.activation_checkpointing)
        _decoder.finish(step)
        return _decoder.norm(self.model.norm, x, step)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., hidden) -> logits (..., V) in hidden's dtype."""
        return small_linear(hidden, self.lm_head_weight)  # F.linear; few rows: the native CPU kernel
