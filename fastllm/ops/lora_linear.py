"""Fused LoRA linear (Hu et al., 2021): a frozen linear plus a trainable low-rank update.

    y = x W^T + b + s * (dropout(x) A^T) B^T

x: (..., in); W: (out, in) and b: (out,) frozen; A: (r, in), B: (out, r) trainable; s the
scale (alpha / r, or alpha / sqrt(r) with rsLoRA). Dropout is given as a bool keep-mask
(..., in) and its probability p: dropout(x) = x * keep / (1 - p).

Backward, with xd = dropout(x), u = xd A^T (rows, r) saved by the forward, g = dy B (rows, r):

    dx = dy W + s * (g A) * keep / (1 - p)
    dA = s * g^T xd            (r, in)
    dB = s * dy^T u            (out, r)

The dense update B A (out, in) is never formed, W and b get no gradient (and no buffer),
and the LoRA branch never owns a (rows, out) tensor: the native path adds it into y with
one addmm, the Triton path inside the base GEMM's tile. The op treats W and b as
constants: call it with weights that do not require grad (LoRALinear freezes them).

Layers: reference -> checks -> registered ops `torch.ops.fastllm.lora_linear` and
`lora_linear_backward` (backend choice, fake implementation, autograd) -> `lora_linear()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_shape, check_tensor

# --------------------------------------------------------------------------- references


def _dropped(x: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                          scale: float, keep: Tensor | None = None, dropout_p: float = 0.0,
                          upcast: bool = True) -> Tensor:
    """The unfused definition (what PEFT runs): base linear plus the scaled low-rank branch.
    With upcast=False it runs in x's own dtype (the low-precision baseline of the tests)."""
    dtype = x.dtype
    if upcast and dtype != torch.float64:
        x, weight, lora_a, lora_b = x.float(), weight.float(), lora_a.float(), lora_b.float()
        bias = bias.float() if bias is not None else None
    y = F.linear(x, weight, bias) + scale * F.linear(F.linear(_dropped(x, keep, dropout_p), lora_a), lora_b)
    return y.to(dtype)


def lora_linear_backward_reference(grad_out: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                                   scale: float, keep: Tensor | None = None,
                                   dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form (dx, dA, dB) in float32 (float64 for float64), from the formulas above."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy = grad_out.reshape(-1, grad_out.shape[-1]).to(acc)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    k2 = keep.reshape(x2.shape) if keep is not None else None
    w, a, b = weight.to(acc), lora_a.to(acc), lora_b.to(acc)
    xd = _dropped(x2, k2, dropout_p)
    g = dy @ b  # (rows, r)
    dx = dy @ w + scale * _dropped(g @ a, k2, dropout_p)
    da = scale * g.t() @ xd
    db = scale * dy.t() @ (xd @ a.t())
    return dx.reshape(x.shape).to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


# --------------------------------------------------------------------------- checks


def _check(x, weight, bias, lora_a, lora_b, keep, dropout_p) -> None:
    for t, name in ((x, "x"), (weight, "weight"), (lora_a, "lora_a"), (lora_b, "lora_b")):
        check_tensor(t, name)
        check_dtype(t, name)
        check_same_device(x, "x", t, name)
        if t is not x and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (same as x), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {list(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (out, in), got {list(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension {in_f} (weight's in_features), got {x.shape[-1]}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a: expected shape (r, {in_f}), got {list(lora_a.shape)}")
    check_shape(lora_b, "lora_b", (out_f, lora_a.shape[0]), "(out_features, r)")
    if bias is not None:
        check_tensor(bias, "bias")
        check_shape(bias, "bias", (out_f,), "out_features")
        check_same_device(x, "x", bias, "bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (same as x), got {bias.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    if keep is not None:
        check_tensor(keep, "keep")
        check_shape(keep, "keep", tuple(x.shape), "same as x")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep: expected dtype bool, got {keep.dtype}")


def _choose(x: Tensor, backend: str) -> str:
    return _choose_on(x.device, backend)


def _choose_on(device: torch.device, backend: str) -> str:
    # On CUDA the native path is the same ATen composition on cuBLAS; it goes first until the
    # GPU benchmark (bench/bench_lora.py) shows the Triton kernel ahead.
    return _backend.choose("lora_linear", device, backend, native_op="lora_linear_fwd",
                           cuda_order=("native", "triton"))


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()  # (rows, features)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                    scale: float, keep: Tensor | None = None, dropout_p: float = 0.0,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Returns (y (..., out), u (rows, r)); u = dropout(x) A^T is kept for the backward."""
    _check(x, weight, bias, lora_a, lora_b, keep, dropout_p)
    chosen = _choose(x, backend)
    out_shape = (*x.shape[:-1], weight.shape[0])
    x2 = _rows(x)
    k2 = _rows(keep) if keep is not None else None
    if chosen == "native":
        y, u = torch.ops.fastllm.lora_linear_fwd(x2, weight, bias, lora_a, lora_b, scale, k2, dropout_p)
        return y.view(out_shape), u
    if chosen == "reference":
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = (_dropped(x2.to(acc), k2, dropout_p) @ lora_a.to(acc).t()).to(x.dtype)
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, keep, dropout_p), u
    from fastllm.triton_kernels.lora_linear import matmul_lowrank

    u = _dropped(x2, k2, dropout_p) @ lora_a.t()  # (rows, r): a skinny GEMM, BLAS does it well
    y = _backend.new_output((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    matmul_lowrank(x2, weight.t(), u, lora_b.t(), scale, y, bias=bias)
    return y.view(out_shape), u


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, keep=None, dropout_p=0.0, backend="auto"):
    _check(x, weight, bias, lora_a, lora_b, keep, dropout_p)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_a.shape[0]))


@torch.library.custom_op("fastllm::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                             u: Tensor, scale: float, keep: Tensor | None = None, dropout_p: float = 0.0,
                             backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx (..., in), dA (r, in), dB (out, r))."""
    chosen = _choose(x, backend)
    if chosen == "reference":
        return lora_linear_backward_reference(grad_out, x, weight, lora_a, lora_b, scale, keep, dropout_p)
    dy2 = _rows(grad_out.to(x.dtype))
    x2 = _rows(x)
    k2 = _rows(keep) if keep is not None else None
    if chosen == "native":
        dx, da, db = torch.ops.fastllm.lora_linear_bwd(dy2, x2, weight, lora_a, lora_b, u, scale, k2, dropout_p)
        return dx.view(x.shape), da, db
    from fastllm.triton_kernels.lora_linear import matmul_lowrank

    g = dy2 @ lora_b  # (rows, r)
    dx = _backend.new_output(x2.shape, dtype=x.dtype, device=x.device)
    s_low = scale / (1.0 - dropout_p) if k2 is not None else scale
    matmul_lowrank(dy2, weight, g, lora_a, s_low, dx, keep=k2)
    da = (g.t() @ _dropped(x2, k2, dropout_p)).mul_(scale)
    db = (dy2.t() @ u).mul_(scale)
    return dx.view(x.shape), da, db


@_lora_linear_backward_op.register_fake
def _(grad_out, x, weight, lora_a, lora_b, u, scale, keep=None, dropout_p=0.0, backend="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(lora_a), \
        torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, keep, dropout_p, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], keep)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend


def _backward(ctx, grad_out, grad_u):
    x, weight, lora_a, lora_b, u, keep = ctx.saved_tensors
    dx, da, db = torch.ops.fastllm.lora_linear_backward(grad_out, x, weight, lora_a, lora_b, u, ctx.scale, keep,
                                                        ctx.dropout_p, ctx.backend)
    # W and b are frozen: no gradient is computed for them (the point of the fused op).
    return dx, None, None, da, db, None, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# A group of LoRA linears that read the same x (a layer's q/k/v, gate/up), without dropout: one
# forward call for the group, and a backward that sums the parts' dx as it makes them (on the CPU,
# each product after the first accumulated by BLAS into dx), where separate ops leave autograd one
# addition of a (rows, in) tensor per extra part and one autograd node per part. Native only:
# `lora_linear_group` runs the parts as separate ops on the other backends.


@torch.library.custom_op("fastllm::lora_linear_group", mutates_args=())
def _lora_linear_group_op(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_a: list[Tensor],
                          lora_b: list[Tensor], scales: list[float]) -> list[Tensor]:
    """Returns [y_0 (..., out_0), .., y_n-1, u_0 (rows, r_0), .., u_n-1]."""
    x2 = _rows(x)
    out = torch.ops.fastllm.lora_linear_group_fwd(x2, weights, biases, lora_a, lora_b, scales)
    n = len(weights)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in out[:n]] + list(out[n:])


@_lora_linear_group_op.register_fake
def _(x, weights, biases, lora_a, lora_b, scales):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return ([x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
            + [x.new_empty((rows, a.shape[0])) for a in lora_a])


@torch.library.custom_op("fastllm::lora_linear_group_backward", mutates_args=())
def _lora_linear_group_backward_op(grad_outs: list[Tensor], x: Tensor, weights: list[Tensor], lora_a: list[Tensor],
                                   lora_b: list[Tensor], us: list[Tensor], scales: list[float]) -> list[Tensor]:
    """Returns [dx (..., in), dA_0, .., dA_n-1, dB_0, .., dB_n-1]."""
    dys = [_rows(g.to(x.dtype)) for g in grad_outs]
    out = torch.ops.fastllm.lora_linear_group_bwd(dys, _rows(x), weights, lora_a, lora_b, us, scales)
    return [out[0].view(x.shape)] + list(out[1:])


@_lora_linear_group_backward_op.register_fake
def _(grad_outs, x, weights, lora_a, lora_b, us, scales):
    return ([torch.empty_like(x, memory_format=torch.contiguous_format)]
            + [torch.empty_like(a) for a in lora_a] + [torch.empty_like(b) for b in lora_b])


def _group_setup_context(ctx, inputs, output):
    x, weights, _, lora_a, lora_b, scales = inputs
    n = len(weights)
    ctx.save_for_backward(x, *weights, *lora_a, *lora_b, *output[n:])
    ctx.n, ctx.scales = n, scales
    # autograd wants the gradients in the inputs' structure: a list for a list of tensors, one
    # None for a list that holds a None
    ctx.bias_list = all(b is not None for b in inputs[2])


def _group_backward(ctx, grads):
    n = ctx.n
    saved = ctx.saved_tensors
    x, weights, lora_a, lora_b, us = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n], \
        saved[1 + 3 * n:]
    out = torch.ops.fastllm.lora_linear_group_backward(list(grads[:n]), x, list(weights), list(lora_a), list(lora_b),
                                                       list(us), ctx.scales)
    return out[0], [None] * n, [None] * n if ctx.bias_list else None, list(out[1:1 + n]), list(out[1 + n:]), None


_lora_linear_group_op.register_autograd(_group_backward, setup_context=_group_setup_context)


def _register_native_fakes() -> None:
    """Fake implementations of the C++ kernels, so opcheck and torch.compile can trace them."""
    from fastllm import _extension

    if not _extension.available():
        return
    if not hasattr(torch.ops.fastllm, "lora_linear_fwd"):
        return  # an extension built before this op existed

    @torch.library.register_fake("fastllm::lora_linear_fwd")
    def _(x, weight, bias, lora_a, lora_b, scale, keep, dropout_p):
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))

    @torch.library.register_fake("fastllm::lora_linear_bwd")
    def _(grad_out, x, weight, lora_a, lora_b, u, scale, keep, dropout_p):
        return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)

    if not hasattr(torch.ops.fastllm, "lora_linear_group_fwd"):
        return

    @torch.library.register_fake("fastllm::lora_linear_group_fwd")
    def _(x, weights, biases, lora_a, lora_b, scales):
        return ([x.new_empty((x.shape[0], w.shape[0])) for w in weights]
                + [x.new_empty((x.shape[0], a.shape[0])) for a in lora_a])

    @torch.library.register_fake("fastllm::lora_linear_group_bwd")
    def _(grad_outs, x, weights, lora_a, lora_b, us, scales):
        return [torch.empty_like(x)] + [torch.empty_like(a) for a in lora_a] + [torch.empty_like(b) for b in lora_b]


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def _check_frozen(weight: Tensor, bias: Tensor | None) -> None:
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("weight, bias: lora_linear treats the base linear as frozen and computes no gradient "
                         "for it; got a weight or bias that requires grad (call requires_grad_(False) on it)")


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                *, keep: Tensor | None = None, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, with dropout(x) = x * keep / (1 - dropout_p).

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r);
    keep: bool (..., in) or None (no dropout). Returns (..., out) in x's dtype. Gradients flow
    to x, lora_a and lora_b only; weight and bias must not require grad.
    backend: None (auto, or FASTLLM_BACKEND), "reference", "triton" or "native".
    """
    _check_frozen(weight, bias)
    y, _ = torch.ops.fastllm.lora_linear(x, weight, bias, lora_a, lora_b, float(scale), keep, float(dropout_p),
                                         backend or "auto")
    return y


@torch.compiler.assume_constant_result  # a fixed choice per device and backend: torch.compile need not trace it
def _group_is_native(device: str, backend: str) -> bool:
    """Whether lora_linear_group runs as its one native op on this device and backend."""
    return _choose_on(torch.device(device), backend) == "native" and hasattr(torch.ops.fastllm, "lora_linear_group_fwd")


def lora_linear_group(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], lora_a: list[Tensor],
                      lora_b: list[Tensor], scales: list[float], *, backend: str | None = None) -> list[Tensor]:
    """[lora_linear(x, weights[i], biases[i], lora_a[i], lora_b[i], scales[i]) for each i], without
    dropout: a group of projections that read the same x (a layer's q/k/v, gate/up). On the
    native backend one op for the group, whose backward sums the parts' gradients for x as it
    makes them (no autograd addition per extra part); on the others the parts' own ops."""
    n = len(weights)
    if n == 0 or not len(biases) == len(lora_a) == len(lora_b) == len(scales) == n:
        raise ValueError(f"weights, biases, lora_a, lora_b, scales: expected one of each per projection (at least "
                         f"one), got {n}, {len(biases)}, {len(lora_a)}, {len(lora_b)}, {len(scales)}")
    if not _group_is_native(str(x.device), backend or "auto"):
        return [lora_linear(x, w, b, a, bb, s, backend=backend)
                for w, b, a, bb, s in zip(weights, biases, lora_a, lora_b, scales)]
    for w, b, a, bb in zip(weights, biases, lora_a, lora_b):
        _check(x, w, b, a, bb, None, 0.0)
        _check_frozen(w, b)
    out = torch.ops.fastllm.lora_linear_group(x, list(weights), list(biases), list(lora_a), list(lora_b),
                                              [float(s) for s in scales])
    return list(out[:n])
