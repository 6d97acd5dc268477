"""Fused LoRA matmuls in Triton: one GEMM with a low-rank term added inside the same tile.

    out = X @ Wop + scale * ((U @ V) * keep) + bias           (keep and bias optional)

    forward : y  = x @ W^T + s * (u @ B^T) + b,      u = dropout(x) @ A^T   (rows, r)
    backward: dx = dy @ W  + s * ((g @ A) * keep),   g = dy @ B             (rows, r)

The base product and the low-rank product accumulate in float32 registers of the same
program and are written once, so neither the (rows, out) LoRA branch nor the dense B @ A is
ever stored. The skinny products (u, g, dA, dB: one side has only r columns) stay with the
vendor BLAS in the launcher in fastllm/ops/lora_linear.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import acc_dtype, interpreting


@triton.jit
def _matmul_lowrank_kernel(
    X, W, U, V, KEEP, BIAS, OUT,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,  # KEEP is (M, N) with OUT's strides
    scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    n_mask = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(W + k[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(k[:, None] < K) & n_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, out_dtype=ACC)

    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        u = tl.load(U + rm[:, None] * stride_um + r[None, :] * stride_ur,
                    mask=m_mask[:, None] & (r[None, :] < R), other=0.0)
        v = tl.load(V + r[:, None] * stride_vr + rn[None, :] * stride_vn,
                    mask=(r[:, None] < R) & n_mask[None, :], other=0.0)
        low = tl.dot(u.to(DOT), v.to(DOT), low, out_dtype=ACC)

    out_offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_KEEP:
        keep = tl.load(KEEP + out_offs, mask=out_mask, other=0)
        low = tl.where(keep != 0, low, 0.0)
    acc += scale * low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(ACC)[None, :]
    tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=out_mask)


# GPU tile shapes (the interpreter gets one small config: autotuning several fails there).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


@functools.cache
def _autotuned():
    return triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "R"])(_matmul_lowrank_kernel)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if interpreting() or dtype == torch.float32:
        return tl.float32  # the interpreter's bf16/fp16 dot is wrong: compute it in float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def matmul_lowrank(x: torch.Tensor, w_t: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float,
                   out: torch.Tensor, *, bias: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ w_t (K, N) + scale * ((u (M, R) @ v (R, N)) * keep) + bias (N,).

    w_t and v may be transposed views (only strides are read); keep is a bool (M, N) mask
    laid out like `out`. Writes `out` and returns it.
    """
    M, K = x.shape
    N = w_t.shape[1]
    R = u.shape[1]
    if x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError("x: the Triton LoRA kernel supports float32, bfloat16 and float16 on CUDA, got float64")
    if M == 0 or N == 0:
        return out
    block_r = max(16, min(64, triton.next_power_of_2(max(R, 1))))
    args = (
        x, w_t, u, v, keep if keep is not None else out, bias if bias is not None else out, out,
        M, N, K, R,
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), float(scale),
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, DOT=_dot_dtype(x.dtype), ACC=acc_dtype(x.dtype), BLOCK_R=block_r)
    if interpreting() or x.device.type != "cuda":
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        _matmul_lowrank_kernel[grid](*args, **flags, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned()[grid](*args, **flags)
    return out
