"""One decode step of a Llama-family decoder over a preallocated KV cache, written with the
rollout engine's fused ops: per layer, RMSNorm -> q/k/v projections -> RoPE fused with the
cache append (kv_append_rope) -> decode attention over the cache -> o_proj, then the MLP.

It reads the model's own submodules (so LoRA-wrapped projections and in-place weight
updates are seen) and never waits on the host, so a CUDA graph can capture it. A model
without the Llama layout falls back to its own forward with the KVCache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastllm.models.llama import LlamaMLP
from fastllm.ops import RMSNorm, _backend, swiglu
from fastllm.ops.decode_attention import decode_attention_reference
from fastllm.ops.kv_append_rope import kv_append_rope_reference
from fastllm.ops.sampling import sample_reference


def is_llama_layout(model) -> bool:
    """Whether `model` has the Llama-family layout the fused decode step reads."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(inner, "inv_freq"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads",
                                                  "head_dim"))


class Kernels:
    """The fused ops of a decode step, resolved once per generate call for a device.

    With the native backend the step also calls the C++/CUDA RMSNorm and SwiGLU kernels
    directly, skipping their autograd-aware Python wrappers (a decode step needs no
    gradients, and on the CPU the wrappers cost more than the tiny kernels)."""

    def __init__(self, device: torch.device, backend: str = "auto"):
        use = {op: _backend.choose(op, device, backend, native_op=native, cuda_order=("native",), has_triton=False)
               for op, native in (("decode_attention", "decode_attention_fwd"),
                                  ("kv_append_rope", "kv_append_rope_fwd"), ("sample", "sample_tokens"))}
        self.backends = use
        ops = torch.ops.fastllm
        self.attention = (ops.decode_attention_fwd if use["decode_attention"] == "native"
                          else decode_attention_reference)
        self.append = ops.kv_append_rope_fwd if use["kv_append_rope"] == "native" else kv_append_rope_reference
        self.sample = ops.sample_tokens if use["sample"] == "native" else sample_reference
        direct = backend != "reference" and use["decode_attention"] == "native"
        self.rms_norm_fwd = ops.rms_norm_fwd if direct and _backend.native_has("rms_norm_fwd", device) else None
        self.swiglu_fwd = ops.swiglu_fwd if direct and _backend.native_has("swiglu_fwd", device) else None

    def norm(self, module, x: Tensor) -> Tensor:
        if self.rms_norm_fwd is not None and type(module) is RMSNorm:
            return self.rms_norm_fwd(x, module.weight, module.eps)
        return module(x)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        return self.swiglu_fwd(gate, up) if self.swiglu_fwd is not None else swiglu(gate, up)

    def mlp(self, module, x: Tensor) -> Tensor:
        if self.swiglu_fwd is not None and type(module) is LlamaMLP:
            return module.down_proj(self.swiglu_fwd(module.gate_proj(x), module.up_proj(x)))
        return module(x)


def _cat_linears(mods) -> tuple[Tensor, Tensor | None] | None:
    """One (sum out, in) weight (and bias) for plain nn.Linear layers read with the same
    input, or None when any is wrapped (LoRA) or the bias settings differ."""
    if not all(type(m) is nn.Linear for m in mods):
        return None
    if len({m.bias is None for m in mods}) != 1:
        return None
    weight = torch.cat([m.weight for m in mods])
    bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return weight, bias


def fuse_projections(model) -> list[tuple]:
    """Per layer, the q/k/v weights and the gate/up weights concatenated, so a decode step
    runs one matmul for each group instead of three and two: at decode batch sizes every
    matmul call costs a thread fork/join, which dominates on a small CPU. Built once per
    generate call (so in-place weight updates between rollouts are seen); (None, None) for a
    layer whose projections are wrapped (LoRA), which then calls its modules."""
    fused = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv = _cat_linears([a.q_proj, a.k_proj, a.v_proj])
        gate_up = _cat_linears([mlp.gate_proj, mlp.up_proj]) if type(mlp) is LlamaMLP else None
        fused.append((qkv, gate_up))
    return fused


def llama_decode_logits(model, cache, tokens: Tensor, positions: Tensor, kernels: Kernels,
                        fused: list[tuple] | None = None) -> Tensor:
    """Logits (B, V) float32 of the next token after `tokens` (B,) at `positions` (B,) int32,
    whose keys/values are appended to `cache` (a KVCache) at those positions.
    fused: fuse_projections(model), or None to call every projection module."""
    inner = model.model
    B = tokens.shape[0]
    inv_freq = inner.inv_freq(tokens.device)
    lengths = positions + 1  # keys to attend to, the new one included
    x = inner.embed_tokens(tokens)  # (B, H): one token per sequence
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        qkv, gate_up = fused[i] if fused is not None else (None, None)
        h = kernels.norm(layer.input_layernorm, x)
        Hq, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        if qkv is not None:
            q, k, v = F.linear(h, *qkv).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = q.view(B, Hq, D), k.view(B, Hkv, D), v.view(B, Hkv, D)  # (B, H, D)
        k_cache, v_cache = cache.k[i], cache.v[i]  # (B, Smax, Hkv, D) views
        q = kernels.append(q, k, v, k_cache, v_cache, positions, inv_freq)
        o = kernels.attention(q, k_cache, v_cache, lengths, 1.0 / math.sqrt(attn.head_dim))  # (B, Hq, D)
        x = x + attn.o_proj(o.reshape(B, attn.n_heads * attn.head_dim))
        h = kernels.norm(layer.post_attention_layernorm, x)
        if gate_up is not None:
            gate, up = F.linear(h, *gate_up).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(kernels.swiglu(gate.contiguous(), up.contiguous()))
        else:
            x = x + kernels.mlp(layer.mlp, h)
    return model.logits(kernels.norm(inner.norm, x)).float()


def generic_decode_logits(model, cache, tokens: Tensor, positions: Tensor) -> Tensor:
    """Fallback for other decoders: the model's own forward with its KVCache."""
    hidden = model(tokens[:, None], position_ids=positions[:, None].long(), kv_cache=cache)
    return model.logits(hidden)[:, 0].float()
