"""RoPE on one new token per sequence, fused with the key/value cache append.

For sequence b at position p_b = positions[b] (also its write slot in the cache), with
angles a_i = p_b * inv_freq_i (i < D/2) and the rotate-half layout (x1 = x[:D/2], x2 = x[D/2:]):

    rope(x) = [x1 cos a - x2 sin a,  x2 cos a + x1 sin a]
    returns  rope(q[b])              (B, Hq, D)
    writes   k_cache[b, p_b] = rope(k[b]),  v_cache[b, p_b] = v[b]

q (B, Hq, D), k and v (B, Hkv, D), k_cache and v_cache (B, Smax, Hkv, D) of q's dtype,
positions (B,) int32 in [0, Smax), inv_freq (D/2,) float32 (fastllm.ops.rope_inv_freq). The
angle is formed in float32 (float64 for float64 inputs) like fastllm.ops.rope_cos_sin, and
the rotation is computed in float32 and rounded once, so a decode step matches the model's
full forward. Inference only (no autograd); the caches are updated in place.

Kernels: C++ CPU (csrc/cpu/kv_append_rope.cpp), CUDA (csrc/cuda/kv_append_rope.cu).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_tensor

# --------------------------------------------------------------------------- reference


def kv_append_rope_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                             positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Plain PyTorch version; updates k_cache and v_cache in place, returns rope(q)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    angle = positions.to(acc)[:, None] * inv_freq.to(acc)  # (B, D/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (B, 1, D/2)

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.to(acc).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    rows = torch.arange(q.shape[0], device=q.device)
    slots = positions.long()
    k_cache[rows, slots] = rotate(k)
    v_cache[rows, slots] = v
    return rotate(q)


# --------------------------------------------------------------------------- checks


def _check(q, k, v, k_cache, v_cache, positions, inv_freq) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache"),
                    (positions, "positions"), (inv_freq, "inv_freq")):
        check_tensor(t, name)
        check_same_device(q, "q", t, name)
    check_dtype(q, "q")
    check_dtype(positions, "positions", (torch.int32,))
    check_dtype(inv_freq, "inv_freq", (torch.float32,))
    if q.dim() != 3 or q.shape[-1] % 2:
        raise ValueError(f"q: expected shape (B, Hq, D) with D even, got {list(q.shape)}")
    B, _, D = q.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k: expected shape [{B}, Hkv, {D}], got {list(k.shape)}")
    Hkv = k.shape[1]
    for t, name in ((k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {list(k.shape)} (same as k), got {list(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[0] != B or tuple(k_cache.shape[2:]) != (Hkv, D):
        raise ValueError(f"k_cache: expected shape [{B}, Smax, {Hkv}, {D}], got {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {list(k_cache.shape)} (same as k_cache), got {list(v_cache.shape)}")
    if tuple(positions.shape) != (B,):
        raise ValueError(f"positions: expected shape [{B}], got {list(positions.shape)}")
    if tuple(inv_freq.shape) != (D // 2,):
        raise ValueError(f"inv_freq: expected shape [{D // 2}] (head_dim / 2), got {list(inv_freq.shape)}")


# --------------------------------------------------------------------------- registered op


@torch.library.custom_op("fastllm::kv_append_rope", mutates_args=("k_cache", "v_cache"))
def _kv_append_rope_op(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                       inv_freq: Tensor, backend: str = "auto") -> Tensor:
    _check(q, k, v, k_cache, v_cache, positions, inv_freq)
    chosen = _backend.choose("kv_append_rope", q.device, backend, native_op="kv_append_rope_fwd",
                             cuda_order=("native",), has_triton=False)
    if chosen == "reference":
        return kv_append_rope_reference(q, k, v, k_cache, v_cache, positions, inv_freq)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache, v_cache: the native kernel writes in place and needs contiguous caches")
    return torch.ops.fastllm.kv_append_rope_fwd(q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache,
                                            positions.contiguous(), inv_freq.contiguous())


@_kv_append_rope_op.register_fake
def _(q, k, v, k_cache, v_cache, positions, inv_freq, backend="auto"):
    _check(q, k, v, k_cache, v_cache, positions, inv_freq)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _register_native_fakes() -> None:
    from fastllm import _extension

    if _extension.available():
        torch.library.register_fake("fastllm::kv_append_rope_fwd")(
            lambda q, k, v, k_cache, v_cache, positions, inv_freq: torch.empty_like(
                q, memory_format=torch.contiguous_format))


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def kv_append_rope(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                   inv_freq: Tensor, *, backend: str | None = None) -> Tensor:
    """Rotate q and k of one new token per sequence by RoPE at `positions`, append k and v to
    the caches at those positions (in place), and return the rotated q (B, Hq, D)."""
    return torch.ops.fastllm.kv_append_rope(q, k, v, k_cache, v_cache, positions, inv_freq, backend or "auto")
