"""RMSNorm in Triton: forward and backward (grad x, grad weight).

    r    = 1 / sqrt(mean(x^2) + eps)        per row
    y    = x * r * w
    dx   = r * (dy*w - xhat * mean(dy*w*xhat)),  xhat = x * r
    dw   = sum over rows of dy * xhat

One program holds a whole row in registers (BLOCK_N >= H). The backward runs a persistent
grid: each program walks a contiguous range of rows, recomputes r from x (cheaper than
storing and re-reading it), and accumulates its share of dw in registers; the (programs, H)
partial sums are added up by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import MAX_FUSED_ROW, ROW_DTYPES, LaunchSpec, acc_dtype, num_programs, pow2_blocks, row_block, row_warps


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y,  # X, Y: (n_rows, n_cols) contiguous; W: (n_cols,)
    n_cols, eps,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(Y + row * n_cols + cols, (x * r * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DX, DW_PARTIAL,  # DY, X, DX: (n_rows, n_cols); DW_PARTIAL: (programs, n_cols)
    n_rows, n_cols, eps, rows_per_program,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        mask = col_mask & (row < n_rows)  # rows past the end load zeros and add nothing
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(ACC)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        xhat = x * r
        gw = dy * w
        c = tl.sum(gw * xhat, axis=0) / n_cols
        tl.store(DX + row * n_cols + cols, (r * (gw - xhat * c)).to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


def _config(block: int, dtype: torch.dtype) -> dict:
    """Launch constants of both kernels for rows padded to `block` elements of `dtype`."""
    return dict(BLOCK_N=block, ACC=acc_dtype(dtype), num_warps=row_warps(block))


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launchers can launch on a GPU: each dtype, and for the row block
    (H rounded up to a power of two, at most MAX_FUSED_ROW) the ends of each warps bucket."""
    specs = []
    for dtype in ROW_DTYPES:
        partial = torch.float64 if dtype == torch.float64 else torch.float32
        for block in pow2_blocks(MAX_FUSED_ROW, row_warps):
            cfg = _config(block, dtype)
            warps = cfg.pop("num_warps")
            specs.append(LaunchSpec(_rms_norm_fwd_kernel, dict.fromkeys("XWY", dtype), cfg, warps, floats=("eps",)))
            specs.append(LaunchSpec(_rms_norm_bwd_kernel, {**dict.fromkeys(["DY", "X", "W", "DX"], dtype),
                                                           "DW_PARTIAL": partial}, cfg, warps, floats=("eps",)))
    return specs


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """x, out: (rows, H) contiguous; weight: (H,). Writes y into `out` and returns it."""
    n_rows, n_cols = x.shape
    block = row_block(n_cols)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(n_rows,)](
            x, weight, out, n_cols, eps, **_config(block, x.dtype),
        )
    return out


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, dx: torch.Tensor
) -> torch.Tensor:
    """dy, x, dx: (rows, H) contiguous; weight: (H,). Writes dx; returns dw (float32/64)."""
    n_rows, n_cols = x.shape
    block = row_block(n_cols)
    programs = max(1, min(n_rows, num_programs(x.device)))
    rows_per_program = triton.cdiv(n_rows, programs)
    partial_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw_partial = torch.empty((programs, n_cols), dtype=partial_dtype, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, dx, dw_partial, n_rows, n_cols, eps, rows_per_program, **_config(block, x.dtype),
    )
    return dw_partial.sum(0)
