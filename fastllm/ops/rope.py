"""Rotary position embedding (Su et al., 2021, "RoFormer"), applied to q and k in one call.

The rotate-half layout used by Llama, Mistral, Qwen2 and Hugging Face: with D the head
dimension, x1 = x[..., :D/2], x2 = x[..., D/2:] and per token the angles
a_i = position * inv_freq_i (i < D/2),

    y1 = x1 * cos(a) - x2 * sin(a)
    y2 = x2 * cos(a) + x1 * sin(a)

The backward is the inverse rotation (the same formula with sin negated).

Shapes: q (B, T, Hq, D) and k (B, T, Hkv, D), or packed q (N, Hq, D), k (N, Hkv, D);
cos and sin (B, T, D/2) or (N, D/2), one row per token. Taking cos/sin per token (from
`rope_cos_sin(inv_freq, position_ids)`) rather than a fixed table lets positions be
anything - packed sequences restart at 0, decode steps continue from a cache length - and
the model computes them once per forward for all its layers. Computed in float32 (float64
for float64 q) and rounded once to q's dtype.

Layers, top to bottom: frequencies (`rope_inv_freq`, Llama-3 scaling) -> references ->
checks -> registered op `torch.ops.fastllm.rope` (backend choice, fake, autograd) ->
functional `apply_rope()` / `rope()`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_tensor

# --------------------------------------------------------------------------- frequencies


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """inv_freq_i = theta^(-2i/D) for i < D/2, float32 (D/2,).

    scaling: None / {"rope_type": "default"}, or the Llama-3 rule {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}:
    wavelengths longer than original/low_freq_factor are divided by `factor`, those shorter
    than original/high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even integer, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise NotImplementedError(f"rope scaling: rope_type {kind!r} is not supported (default, llama3)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of position * inv_freq: position_ids (...,) -> two (..., D/2) tensors.

    The angle is formed in float32 (float64 when dtype is float64), as Hugging Face does."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    angle = position_ids.to(acc)[..., None] * inv_freq.to(device=position_ids.device, dtype=acc)
    return angle.cos().to(dtype), angle.sin().to(dtype)


# --------------------------------------------------------------------------- references


def _rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, upcast: bool) -> Tensor:
    dtype = x.dtype
    acc = dtype if (not upcast or dtype == torch.float64) else torch.float32
    xf = x.to(acc)
    c, s = cos.to(acc).unsqueeze(-2), sin.to(acc).unsqueeze(-2)  # (..., 1, D/2): every head
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(dtype)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Plain PyTorch RoPE on q and k (see module docstring); upcast=False runs in q's dtype."""
    return _rotate_reference(q, cos, sin, upcast), _rotate_reference(k, cos, sin, upcast)


def rope_backward_reference(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of rope_reference: the inverse rotation of the output gradients."""
    return _rotate_reference(dq, cos, -sin, True), _rotate_reference(dk, cos, -sin, True)


# --------------------------------------------------------------------------- checks


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    for t, name in ((q, "q"), (k, "k"), (cos, "cos"), (sin, "sin")):
        check_tensor(t, name)
        check_dtype(t, name)
    check_same_device(q, "q", k, "k")
    check_same_device(q, "q", cos, "cos")
    check_same_device(q, "q", sin, "sin")
    if q.dtype != k.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (same as q), got {k.dtype}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q: expected shape (B, T, H, D) or (N, H, D), got {list(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected shape {list(q.shape[:-2])} + [Hkv, {q.shape[-1]}] (as q), "
                         f"got {list(k.shape)}")
    D = q.shape[-1]
    if D % 2:
        raise ValueError(f"q: expected an even head dimension, got {D}")
    expected = list(q.shape[:-2]) + [D // 2]
    for t, name in ((cos, "cos"), (sin, "sin")):
        if list(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} (tokens of q, head_dim/2), got {list(t.shape)}")


def _choose(q: Tensor, backend: str) -> str:
    return _backend.choose("rope", q.device, backend, native_op="rope_fwd")


def _rope_dispatch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str, inverse: bool):
    chosen = _choose(q, backend)
    if chosen == "reference":
        s = -sin if inverse else sin
        return _rotate_reference(q, cos, s, True), _rotate_reference(k, cos, s, True)
    D = q.shape[-1]
    q3 = q.reshape(-1, q.shape[-2], D).contiguous()  # (N, Hq, D)
    k3 = k.reshape(-1, k.shape[-2], D).contiguous()  # (N, Hkv, D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c2 = cos.reshape(-1, D // 2).to(acc).contiguous()  # (N, D/2)
    s2 = sin.reshape(-1, D // 2).to(acc).contiguous()
    if chosen == "native":
        qo, ko = torch.ops.fastllm.rope_fwd(q3, k3, c2, s2, inverse)
    else:
        from fastllm.triton_kernels.rope import rope_fwd

        qo = _backend.new_output(q3.shape, dtype=q.dtype, device=q.device)
        ko = _backend.new_output(k3.shape, dtype=k.dtype, device=k.device)
        rope_fwd(q3, k3, c2, s2, qo, ko, inverse)
    return qo.view(q.shape), ko.view(k.shape)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin)
    return _rope_dispatch(q, k, cos, sin, backend, inverse=False)


@_rope_op.register_fake
def _(q, k, cos, sin, backend="auto"):
    _check(q, k, cos, sin)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("fastllm::rope_backward", mutates_args=())
def _rope_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    return _rope_dispatch(dq, dk, cos, sin, backend, inverse=True)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin, backend="auto"):
    return (torch.empty_like(dq, memory_format=torch.contiguous_format),
            torch.empty_like(dk, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backend = backend
    ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.fastllm.rope_backward(dq.to(ctx.q_dtype), dk.to(ctx.k_dtype), cos, sin, ctx.backend)
    return dq, dk, None, None, None  # cos and sin are constants (functions of positions)


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    from fastllm import _extension

    if not _extension.available():
        return

    @torch.library.register_fake("fastllm::rope_fwd")
    def _(q, k, cos, sin, inverse):
        return torch.empty_like(q), torch.empty_like(k)


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotate q (B, T, Hq, D) / (N, Hq, D) and k (same leading dims, Hkv heads) by per-token
    cos, sin (B, T, D/2) / (N, D/2). Returns (q_rot, k_rot) in q's dtype; q and k are read
    in one kernel launch. backend: None (auto, or FASTLLM_BACKEND), "reference", "triton"
    or "native"."""
    return torch.ops.fastllm.rope(q, k, cos, sin, backend or "auto")


def rope(q: Tensor, k: Tensor, inv_freq: Tensor, position_ids: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """apply_rope with cos/sin formed from position_ids (q's leading dims, any integers)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(inv_freq, position_ids, dtype)
    return apply_rope(q, k, cos, sin, backend=backend)
