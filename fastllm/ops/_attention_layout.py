"""One packed layout for every attention call, shared by the Triton and C++ kernels.

Kernels see q (total_q, Hq, D), k/v (total_k, Hkv, D), offsets cu_q/cu_k (B+1,) int32,
an optional per-key byte `keep` (total_k,) and `n_prefix`: the first n_prefix keys of each
sequence are prefix keys, visible to every query. This module turns the public layouts into
that one and maps key/value gradients back:

  padded  q (B, T, Hq, D), k/v (B, S, Hkv, D), key_padding_mask (B, S), prefix (B, P, Hkv, D)
          -> k' = cat(prefix, k) along the sequence, cu = arange(B+1) * length
  varlen  q (total, Hq, D), k/v (total, Hkv, D), cu_seqlens, prefix (B, P, Hkv, D)
          -> the P prefix rows of sequence b are placed just before its own rows
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    q: Tensor  # (total_q, Hq, D)
    k: Tensor  # (total_k, Hkv, D), prefix rows first within each sequence
    v: Tensor
    cu_q: Tensor  # (B+1,) int32
    cu_k: Tensor
    keep: Tensor | None  # (total_k,) int8, 1 where the key is real
    n_prefix: int
    max_q: int
    max_k: int
    # Varlen with prefix: where the original key rows and the prefix rows went.
    main_rows: Tensor | None = None  # (total_k_in,) int64
    prefix_rows: Tensor | None = None  # (B * P,) int64


def check_cu_seqlens(cu_seqlens: Tensor, total_q: int, total_k: int, max_seqlen: int = 0) -> None:
    """The values of cu_seqlens, checked the same way for every backend: start at 0, never
    decrease, end at the row count of q and k. Read on the host when they live there, or
    when max_seqlen is not given (the layout then reads them anyway); on an accelerator with
    max_seqlen given, the kernels trust them (checking would wait on the device every call)."""
    if cu_seqlens.device.type != "cpu" and max_seqlen > 0:
        return
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected offsets starting at 0, got {cu[:8]}")
    if cu[-1] != total_q or cu[-1] != total_k:
        raise ValueError(f"cu_seqlens: expected the last offset to equal the number of rows of q and k "
                         f"({total_q}, {total_k}), got {cu[-1]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu[b]} then {cu[b + 1]} at "
                             f"index {b}")
    longest = max((cu[b + 1] - cu[b] for b in range(len(cu) - 1)), default=0)
    if max_seqlen > 0 and longest > max_seqlen:
        raise ValueError(f"max_seqlen: expected at least the longest sequence, {longest}, got {max_seqlen}")


def _offsets(batch: int, length: int, device) -> Tensor:
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * length


def pack(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, prefix_k: Tensor | None,
         prefix_v: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int) -> Packed:
    P = 0 if prefix_k is None else prefix_k.shape[1]
    if cu_seqlens is None:
        B, T, Hq, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        if P:
            k = torch.cat([prefix_k, k], dim=1)
            v = torch.cat([prefix_v, v], dim=1)
        keep = None
        if key_padding_mask is not None:
            keep = key_padding_mask.to(torch.int8)
            if P:
                keep = torch.cat([keep.new_ones(B, P), keep], dim=1)
            keep = keep.reshape(-1).contiguous()
        return Packed(
            q.reshape(B * T, Hq, D), k.reshape(B * (P + S), Hkv, D), v.reshape(B * (P + S), Hkv, D),
            _offsets(B, T, q.device), _offsets(B, P + S, q.device), keep, P, T, P + S,
        )
    cu = cu_seqlens.to(torch.int32).contiguous()
    B = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    max_q = max_seqlen if max_seqlen > 0 else (int(lens.max()) if B > 0 else 0)
    if not P:
        return Packed(q, k, v, cu, cu, None, 0, max_q, max_q)
    Hkv, D = k.shape[1], k.shape[2]
    steps = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    cu_k = cu + P * steps
    seq_of_row = torch.repeat_interleave(torch.arange(B, device=q.device), lens.long(), output_size=k.shape[0])
    main_rows = torch.arange(k.shape[0], device=q.device) + P * (seq_of_row + 1)
    prefix_rows = (cu_k[:-1].long()[:, None] + torch.arange(P, device=q.device)).reshape(-1)
    total_k = k.shape[0] + B * P
    kp = k.new_empty((total_k, Hkv, D))
    vp = v.new_empty((total_k, Hkv, D))
    kp[main_rows] = k
    vp[main_rows] = v
    kp[prefix_rows] = prefix_k.reshape(B * P, Hkv, D)
    vp[prefix_rows] = prefix_v.reshape(B * P, Hkv, D)
    return Packed(q, kp, vp, cu, cu_k, None, P, max_q, max_q + P, main_rows, prefix_rows)


def unpack_kv_grad(packed: Packed, grad: Tensor, k_shape, prefix_shape) -> tuple[Tensor, Tensor | None]:
    """Split a packed key (or value) gradient into the gradient of k and of the prefix."""
    P = packed.n_prefix
    if packed.main_rows is not None:  # varlen with prefix
        return grad[packed.main_rows], grad[packed.prefix_rows].view(prefix_shape)
    if len(k_shape) == 3:  # varlen without prefix
        return grad, None
    B, S = k_shape[0], k_shape[1]
    g = grad.view(B, P + S, *k_shape[2:])
    if not P:
        return g, None
    # Copies: the op's outputs must not alias each other.
    return g[:, P:].clone(memory_format=torch.contiguous_format), g[:, :P].clone(memory_format=torch.contiguous_format)
