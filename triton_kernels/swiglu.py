"""SwiGLU in Triton, elementwise over the flattened tensors.

    forward : y = g * s * u,                     s = sigmoid(g)
    backward: dg = dy * u * s * (1 + g*(1-s)),   du = dy * g * s

Each program handles BLOCK contiguous elements; the sigmoid is recomputed in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import ROW_DTYPES, LaunchSpec, acc_dtype

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def _config(dtype: torch.dtype) -> dict:
    """Launch constants of both kernels for inputs of `dtype`."""
    return dict(BLOCK=BLOCK, ACC=acc_dtype(dtype), num_warps=4)


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launchers can launch on a GPU (one per dtype and kernel)."""
    specs = []
    for dtype in ROW_DTYPES:
        cfg = _config(dtype)
        warps = cfg.pop("num_warps")
        specs.append(LaunchSpec(_swiglu_fwd_kernel, dict.fromkeys("GUY", dtype), cfg, warps))
        specs.append(LaunchSpec(_swiglu_bwd_kernel, dict.fromkeys(["DY", "G", "U", "DG", "DU"], dtype), cfg, warps))
    return specs


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """gate, up, out: same shape, contiguous. Writes silu(gate) * up into out and returns it."""
    n = gate.numel()
    if n > 0:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, **_config(gate.dtype))
    return out


def swiglu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d_gate: torch.Tensor, d_up: torch.Tensor
) -> None:
    """All five tensors: same shape, contiguous. Writes the gradients of gate and up."""
    n = gate.numel()
    if n > 0:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, d_gate, d_up, n, **_config(gate.dtype))
