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

from .utils import GPU_DTYPES, LaunchSpec, acc_dtype, interpreting


@triton.jit
def _matmul_lowrank_kernel(
    X, W, U, V, KEEP, BIAS, OUT,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,  # KEEP is (M, N) with OUT's strides
    scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 (as torch's default matmul); bf16/fp16 dots ignore it
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
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)

    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        u = tl.load(U + rm[:, None] * stride_um + r[None, :] * stride_ur,
                    mask=m_mask[:, None] & (r[None, :] < R), other=0.0)
        v = tl.load(V + r[:, None] * stride_vr + rn[None, :] * stride_vn,
                    mask=(r[:, None] < R) & n_mask[None, :], other=0.0)
        low = tl.dot(u.to(DOT), v.to(DOT), low, input_precision=PRECISION, out_dtype=ACC)

    out_offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_KEEP:
        keep = tl.load(KEEP + out_offs, mask=out_mask, other=0)
        low = tl.where(keep != 0, low, 0.0)
    acc += scale * low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(ACC)[None, :]
    tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=out_mask)


# GPU tile shapes, autotuned per shape (the interpreter gets one small config: autotuning several
# fails there). bf16/fp16 run on tensor cores; float32 products are IEEE FMAs unrolled per thread,
# so float32 gets one smaller tile (128 x 256 x 64 in 3 stages needs 192 KiB of shared memory, over
# the 163 KiB one block may use on A100).
_GPU_CONFIGS = {
    "half": [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ],
    "float32": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ],
}


def _tile_kind(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


@functools.cache
def _autotuned(kind: str):
    return triton.autotune(configs=_GPU_CONFIGS[kind], key=["M", "N", "K", "R"])(_matmul_lowrank_kernel)


def _dot_dtype(dtype: torch.dtype, interpret: bool | None = None):
    if dtype == torch.float64:
        return tl.float64
    if (interpreting() if interpret is None else interpret) or dtype == torch.float32:
        return tl.float32  # the interpreter's bf16/fp16 dot is wrong: compute it in float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _flags(dtype: torch.dtype, rank: int, has_bias: bool, has_keep: bool, interpret: bool | None = None) -> dict:
    """Constants of every launch; the tile (BLOCK_M/N/K, GROUP_M, warps, stages) comes from
    _GPU_CONFIGS of the dtype (autotuned) on a GPU and is fixed under the interpreter."""
    return dict(HAS_BIAS=has_bias, HAS_KEEP=has_keep, DOT=_dot_dtype(dtype, interpret), ACC=acc_dtype(dtype),
                PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_R=max(16, min(64, triton.next_power_of_2(max(rank, 1)))))


# The two layouts the op calls the kernel with; the unit strides are passed as 1, which a launch
# specialises on. Forward: w_t = W^T and v = B^T are transposed views. Backward: W and A as stored.
_LAYOUT_ONES = {"forward": ("stride_xk", "stride_wk", "stride_ur", "stride_vr", "stride_on"),
                "backward": ("stride_xk", "stride_wn", "stride_ur", "stride_vn", "stride_on")}


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launcher can launch on a GPU: each dtype with each of its autotuned tiles and BLOCK_R
    (16, 32, 64), in both layouts with the layout's switch on (bias forward, keep backward);
    then each switch off once."""
    def spec(config, dtype, rank, layout, switch=True):
        has_bias, has_keep = (switch, False) if layout == "forward" else (False, switch)
        constexprs = {**_flags(dtype, rank, has_bias, has_keep, interpret=False), **config.kwargs,
                      **dict.fromkeys(_LAYOUT_ONES[layout], 1)}
        pointers = {**dict.fromkeys(["X", "W", "U", "V", "OUT"], dtype), "KEEP": torch.bool if has_keep else dtype,
                    "BIAS": dtype}
        return LaunchSpec(_matmul_lowrank_kernel, pointers, constexprs, config.num_warps, config.num_stages,
                          floats=("scale",))

    specs = [spec(config, dtype, rank, layout) for dtype in GPU_DTYPES for config in _GPU_CONFIGS[_tile_kind(dtype)]
             for rank in (16, 32, 64) for layout in _LAYOUT_ONES]
    return specs + [spec(_GPU_CONFIGS["half"][-1], torch.bfloat16, 64, layout, switch=False)
                    for layout in _LAYOUT_ONES]


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
    args = (
        x, w_t, u, v, keep if keep is not None else out, bias if bias is not None else out, out,
        M, N, K, R,
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), float(scale),
    )
    flags = _flags(x.dtype, R, bias is not None, keep is not None)
    if interpreting() or x.device.type != "cuda":
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        _matmul_lowrank_kernel[grid](*args, **flags, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned(_tile_kind(x.dtype))[grid](*args, **flags)
    return out
