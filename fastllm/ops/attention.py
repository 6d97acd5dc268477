"""Scaled dot-product attention for training and prefill.

Layout follows FlashAttention: q (B, T, Hq, D), k/v (B, S, Hkv, D) with Hq % Hkv == 0
(grouped-query attention without repeating K/V), or packed variable-length batches
q (total_q, Hq, D), k/v (total_k, Hkv, D) with cumulative offsets cu_seqlens (B+1,) int32.

This module currently holds the interface and its reference; the fused kernels come
with the attention issue and keep this signature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    upcast: bool = True,
) -> Tensor:
    """Plain attention on padded batches. q: (B, T, Hq, D); k, v: (B, S, Hkv, D).

    key_padding_mask: (B, S) bool, True where the key is real.
    prefix_k/prefix_v: (B, P, Hkv, D): P extra keys every query attends to (prefix tuning);
    they come before the S keys and are never masked. Causal masking aligns the last query
    with the last key (query i sees keys j <= i + S - T), as FlashAttention does.
    Returns (B, T, Hq, D) in q's dtype.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
        prefix_k = None if prefix_k is None else prefix_k.float()
        prefix_v = None if prefix_v is None else prefix_v.float()
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // Hkv
    kk = k.repeat_interleave(group, dim=2)  # (B, S, Hq, D)
    vv = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk) * scale  # (B, Hq, T, S)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    mask = mask.expand(B, 1, T, S)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    if prefix_k is not None:
        P = prefix_k.shape[1]
        pk = prefix_k.repeat_interleave(group, dim=2)
        pv = prefix_v.repeat_interleave(group, dim=2)
        scores = torch.cat([torch.einsum("bthd,bshd->bhts", q, pk) * scale, scores], dim=-1)
        visible = torch.ones(B, 1, T, P, dtype=torch.bool, device=q.device)  # prefix: never masked
        mask = torch.cat([visible, mask.expand(B, 1, T, S)], dim=-1)
        vv = torch.cat([pv, vv], dim=1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A query with no visible key (fully padded row) gets zeros instead of NaN.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, vv)
    return out.to(dtype)


def attention_varlen_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, **kwargs
) -> Tensor:
    """Packed batches: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i occupies rows
    cu_seqlens[i]:cu_seqlens[i+1]. Each sequence attends only within itself."""
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        outs.append(attention_reference(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **kwargs)[0])
    return torch.cat(outs, dim=0)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Attention entry point used by the models (see module docstring for layouts).

    cu_seqlens: (B+1,) int32 offsets for packed q/k/v of shape (total, H, D); then q, k
    and v share the offsets (self-attention over packed documents).
    """
    if cu_seqlens is not None:
        return attention_varlen_reference(q, k, v, cu_seqlens, cu_seqlens, causal=causal,
                                          softmax_scale=softmax_scale)
    return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                               key_padding_mask=key_padding_mask, prefix_k=prefix_k, prefix_v=prefix_v)
