"""Decode attention: one new query per sequence against a preallocated key/value cache.

    out[b, h] = softmax(scale * q[b, h] . K[b, :len_b, h // G]^T) @ V[b, :len_b, h // G]

q (B, Hq, D); k_cache, v_cache (B, Smax, Hkv, D) with Hkv dividing Hq (G = Hq / Hkv query
heads share a key/value head, grouped-query attention); lengths (B,) int32 in [0, Smax],
how many cached keys each sequence attends to (the new token's own key included, already
appended). Slots at or past lengths[b] are never read, so sequences of different lengths
share one cache. A sequence with length 0 gets zeros. Computed in float32 (float64 for
float64), rounded once to q's dtype. Inference only: no autograd.

Kernels: C++ CPU (csrc/cpu/decode_attention.cpp: per (sequence, kv head), online softmax
over blocks of keys) and CUDA (csrc/cuda/decode_attention.cu: split-K flash-decoding, the
keys of a sequence split across blocks, partial results merged by a second kernel).

Layers: reference -> checks -> registered op `torch.ops.fastllm.decode_attention` (backend
choice, fake) -> functional `decode_attention()`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_tensor

# --------------------------------------------------------------------------- reference


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                               scale: float | None = None, upcast: bool = True) -> Tensor:
    """Plain PyTorch decode attention (see the module docstring)."""
    B, Hq, D = q.shape
    Smax, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = q.dtype
    acc = dtype if (not upcast or dtype == torch.float64) else torch.float32
    G = Hq // Hkv
    k = k_cache.to(acc).repeat_interleave(G, dim=2)  # (B, Smax, Hq, D)
    v = v_cache.to(acc).repeat_interleave(G, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(acc), k) * scale  # (B, Hq, Smax)
    valid = torch.arange(Smax, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # (B, Smax)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: all zero
    return torch.einsum("bhs,bshd->bhd", probs, v).to(dtype)


# --------------------------------------------------------------------------- checks


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor) -> None:
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (lengths, "lengths")):
        check_tensor(t, name)
    check_dtype(q, "q")
    check_dtype(lengths, "lengths", (torch.int32,))
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache"), (lengths, "lengths")):
        check_same_device(q, "q", t, name)
    if q.dim() != 3:
        raise ValueError(f"q: expected shape (B, Hq, D), got {list(q.shape)}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache: expected shape [{B}, Smax, Hkv, {D}] (batch and head_dim of q), "
                         f"got {list(k_cache.shape)}")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache: expected dtype {q.dtype} (same as q), got {k_cache.dtype}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache: expected shape {list(k_cache.shape)} and dtype {k_cache.dtype} (same as "
                         f"k_cache), got {list(v_cache.shape)} {v_cache.dtype}")
    if Hq % k_cache.shape[2]:
        raise ValueError(f"k_cache: the number of kv heads ({k_cache.shape[2]}) must divide the number of "
                         f"query heads ({Hq})")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths: expected shape [{B}], got {list(lengths.shape)}")


# --------------------------------------------------------------------------- registered op


@torch.library.custom_op("fastllm::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float,
                         backend: str = "auto") -> Tensor:
    _check(q, k_cache, v_cache, lengths)
    chosen = _backend.choose("decode_attention", q.device, backend, native_op="decode_attention_fwd",
                             cuda_order=("native",), has_triton=False)
    if chosen == "reference":
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    return torch.ops.fastllm.decode_attention_fwd(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                                  lengths.contiguous(), scale)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale, backend="auto"):
    _check(q, k_cache, v_cache, lengths)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _register_native_fakes() -> None:
    from fastllm import _extension

    if not _extension.available():
        return

    @torch.library.register_fake("fastllm::decode_attention_fwd")
    def _(q, k_cache, v_cache, lengths, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None,
                     *, backend: str | None = None) -> Tensor:
    """Attention of one new query per sequence over its cached keys: q (B, Hq, D), caches
    (B, Smax, Hkv, D), lengths (B,) int32 -> (B, Hq, D). scale defaults to 1/sqrt(D).

    backend: None (auto, or FASTLLM_BACKEND), "reference" or "native" (C++ / CUDA)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.fastllm.decode_attention(q, k_cache, v_cache, lengths, scale, backend or "auto")
