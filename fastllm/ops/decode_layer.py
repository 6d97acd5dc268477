"""One Llama-family block's decode step in one native call (CPU).

For x (B, H), one new token per sequence at positions p (B,) int32, the block's weights and
the layer's key/value caches (B, Smax, Hkv, D):

    h = rms_norm(x, norm1, eps1);  [q | k | v] = h w_qkv^T + b_qkv
    q = rope(q);  k_cache[b, p_b] = rope(k[b]);  v_cache[b, p_b] = v[b]      (kv_append_rope)
    x = x + decode_attention(q, k_cache, v_cache, lengths, scale) w_o^T + b_o
    h = rms_norm(x, norm2, eps2);  [g | u] = h w_gate_up^T + b_gate_up
    returns x + swiglu(g, u) w_down^T + b_down                               (B, H)

w_qkv ((Hq + 2 Hkv) D, H): the q, k and v projections' rows stacked, or the three as a list;
w_gate_up (2 I, H): gate's rows, then up's, or the two as a list; biases None or (rows,) (a
group's bias always fused). Hkv and D come from the caches, Hq from w_qkv. The
caches are updated in place, lengths (B,) int32 are the keys each query attends to
(positions + 1 in a decode step).

The native kernel (csrc/cpu/decode_layer.cpp) runs the decode branch's own kernels in its
order, so it equals the block's per-op decode step bit for bit; it exists because at batch 1
the Python between those kernels costs more than the kernels other than the products. The
model's decode branch calls it directly (`DecodeKernels.decode_layer`, no argument checks in
Python); `decode_layer` here is the checked entry. Inference only (no autograd), float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from .decode_attention import decode_attention_reference
from .kv_append_rope import kv_append_rope_reference
from .rms_norm import rms_norm_reference
from .swiglu import swiglu_reference


def decode_layer_reference(x: Tensor, norm1: Tensor, eps1: float, w_qkv: Tensor, b_qkv: Tensor | None,
                           w_o: Tensor, b_o: Tensor | None, norm2: Tensor, eps2: float, w_gate_up: Tensor,
                           b_gate_up: Tensor | None, w_down: Tensor, b_down: Tensor | None, k_cache: Tensor,
                           v_cache: Tensor, positions: Tensor, lengths: Tensor, inv_freq: Tensor,
                           scale: float) -> Tensor:
    """Plain PyTorch version (see the module docstring); updates the caches in place."""
    w_qkv, w_gate_up = _fused(w_qkv), _fused(w_gate_up)
    B, _ = x.shape
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    Hq = w_qkv.shape[0] // D - 2 * Hkv
    q, k, v = F.linear(rms_norm_reference(x, norm1, eps1), w_qkv, b_qkv).split([Hq * D, Hkv * D, Hkv * D], -1)
    q = kv_append_rope_reference(q.reshape(B, Hq, D), k.reshape(B, Hkv, D), v.reshape(B, Hkv, D), k_cache, v_cache,
                                 positions, inv_freq)
    a = decode_attention_reference(q, k_cache, v_cache, lengths, scale)
    x = x + F.linear(a.reshape(B, Hq * D), w_o, b_o)
    g, u = F.linear(rms_norm_reference(x, norm2, eps2), w_gate_up, b_gate_up).chunk(2, -1)
    return x + F.linear(swiglu_reference(g, u), w_down, b_down)


def _parts(w: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [w] if isinstance(w, Tensor) else list(w)


def _fused(w: Tensor | Sequence[Tensor]) -> Tensor:
    """A projection group's weight as one tensor: itself, or its parts' rows stacked."""
    parts = _parts(w)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_group(name: str, parts: list[Tensor], sizes: list[int], cols: int, bias: Tensor | None,
                 bias_name: str, hint: str = "") -> None:
    """A projection group's weight: one fused (sum of sizes, cols) matrix, or one (sizes[i], cols)
    matrix per part (the kernel's check_group); its bias, if any, (sum of sizes,). A single
    projection is a group of one."""
    rows = sum(sizes)
    if len(parts) not in (1, len(sizes)):
        raise ValueError(f"{name}: expected one fused tensor or {len(sizes)} parts, got {len(parts)} tensors")
    for i, w in enumerate(parts):
        want = [rows if len(parts) == 1 else sizes[i], cols]
        if w.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {w.dtype}")
        if list(w.shape) != want:
            what = "shape" if len(parts) == 1 else f"part {i} of shape"
            raise ValueError(f"{name}: expected {what} {want}{hint}, got {list(w.shape)}")
    if bias is not None and list(bias.shape) != [rows]:
        raise ValueError(f"{bias_name}: expected shape [{rows}], got {list(bias.shape)}")


def _check(x, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, b_gate_up, w_down, b_down, k_cache, v_cache,
           positions, lengths, inv_freq) -> None:
    named = {"x": x, "norm1": norm1, "b_qkv": b_qkv, "b_o": b_o, "norm2": norm2, "b_gate_up": b_gate_up,
             "b_down": b_down, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in named.items():
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (B, H), got {list(x.shape)}")
    B, H = x.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache, v_cache: expected equal shapes [{B}, Smax, Hkv, D], got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    qkv, gate_up = _parts(w_qkv), _parts(w_gate_up)
    for name, group, count in (("w_qkv", qkv, 3), ("w_gate_up", gate_up, 2)):
        if len(group) not in (1, count) or group[0].dim() != 2:
            raise ValueError(f"{name}: expected one fused ({H})-column matrix or {count} parts, got shapes "
                             f"{[list(w.shape) for w in group]}")
    # Hq from the q rows (the first of three parts, or the fused rows less k's and v's), as the
    # kernel does; the intermediate size likewise from gate's rows
    q_rows = qkv[0].shape[0] if len(qkv) == 3 else qkv[0].shape[0] - 2 * Hkv * D
    Hq = q_rows // D if q_rows > 0 and q_rows % D == 0 else 0
    inter = gate_up[0].shape[0] if len(gate_up) == 2 else gate_up[0].shape[0] // 2
    hint = f" (Hkv={Hkv} and head_dim={D} from k_cache)"
    if Hq == 0:
        raise ValueError(f"w_qkv: expected (Hq + 2 * {Hkv}) * {D} rows of {H} columns in all{hint}, got "
                         f"{list(qkv[0].shape)}")
    _check_group("w_qkv", qkv, [Hq * D, Hkv * D, Hkv * D], H, b_qkv, "b_qkv", hint)
    _check_group("w_o", [w_o], [H], Hq * D, b_o, "b_o", hint)
    _check_group("w_gate_up", gate_up, [inter, inter], H, b_gate_up, "b_gate_up")
    _check_group("w_down", [w_down], [H], inter, b_down, "b_down")
    for name, t in (("positions", positions), ("lengths", lengths)):
        if t.dtype != torch.int32 or list(t.shape) != [B]:
            raise ValueError(f"{name}: expected shape [{B}] int32, got {list(t.shape)} {t.dtype}")


def _register_native_fake() -> None:
    from fastllm import _extension

    if _extension.available():
        torch.library.register_fake("fastllm::decode_layer_fwd")(
            lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format))


_register_native_fake()


def decode_layer(x: Tensor, norm1: Tensor, eps1: float, w_qkv: Tensor | Sequence[Tensor], b_qkv: Tensor | None,
                 w_o: Tensor, b_o: Tensor | None, norm2: Tensor, eps2: float, w_gate_up: Tensor | Sequence[Tensor],
                 b_gate_up: Tensor | None,
                 w_down: Tensor, b_down: Tensor | None, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                 lengths: Tensor, inv_freq: Tensor, scale: float | None = None, *,
                 backend: str | None = None) -> Tensor:
    """The block's output (B, H) for one decode step (see the module docstring); the caches
    are updated in place. scale defaults to 1 / sqrt(head_dim). backend: "auto" (the native
    kernel where it is built, on the CPU), "native" or "reference"."""
    _check(x, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, b_gate_up, w_down, b_down, k_cache, v_cache,
           positions, lengths, inv_freq)
    scale = 1.0 / math.sqrt(k_cache.shape[-1]) if scale is None else scale
    args = (x, norm1, eps1, w_qkv, b_qkv, w_o, b_o, norm2, eps2, w_gate_up, b_gate_up, w_down, b_down, k_cache,
            v_cache, positions, lengths, inv_freq, scale)
    chosen = _backend.choose("decode_layer", x.device, backend or "auto", native_op="decode_layer_fwd",
                             cuda_order=("native",), has_triton=False)
    if chosen == "reference":
        return decode_layer_reference(*args)
    native = [a.contiguous() if isinstance(a, Tensor) else a for a in args]
    native[3] = [w.contiguous() for w in _parts(w_qkv)]
    native[9] = [w.contiguous() for w in _parts(w_gate_up)]
    return torch.ops.fastllm.decode_layer_fwd(*native)
