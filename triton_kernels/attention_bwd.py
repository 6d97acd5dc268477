"""Flash attention backward in Triton (layout, masks and notation as in attention_fwd.py).

With p_ij = exp(s_ij - lse_i) recomputed from the saved log-sum-exp (never stored):
    delta_i = sum_d dO_id * O_id                    (computed by the launcher)
    dV_j    = sum_i p_ij dO_i
    dS_ij   = p_ij * (dO_i . v_j - delta_i)
    dK_j    = scale * sum_i dS_ij q_i
    dQ_i    = scale * sum_j dS_ij k_j

Kernels:
  _attn_bwd_dkdv_kernel: one program per (key block, batch, kv head). It walks every query
      head of its group and every query block that can see its keys, so dK/dV of a shared
      (GQA) head are summed in registers - no repeated K/V, no atomics for dK/dV. With
      ATOMIC_DQ it also adds dS @ K into a float32 dQ buffer with atomics (fast, order of
      additions not fixed).
  _attn_bwd_dq_kernel: one program per (query block, batch, query head), walking the key
      blocks; used instead of the atomics when a deterministic backward is asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2E, attention_pointers, block_d, dot_precision, head_dims
from .utils import GPU_DTYPES, LaunchSpec, interpreting


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K, KEEP,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, n_heads, n_kv_heads, group, head_dim, n_prefix, scale, scale_log2,
    IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    q_start = tl.load(CU_Q + b).to(tl.int64)
    q_len = tl.load(CU_Q + b + 1).to(tl.int64) - q_start
    k_start = tl.load(CU_K + b).to(tl.int64)
    k_len = tl.load(CU_K + b + 1).to(tl.int64) - k_start
    if pid_n * BLOCK_N >= k_len:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < head_dim
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + (k_start + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    col_ok = n_ok
    if HAS_KEEP:
        keep = tl.load(KEEP + k_start + offs_n, mask=n_ok, other=0)
        col_ok = col_ok & (keep != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    lo = q_len * 0
    if IS_CAUSAL:
        # Queries before (first key - diag) see none of these keys, unless they are prefix keys.
        if pid_n * BLOCK_N >= n_prefix:
            lo = tl.maximum(pid_n * BLOCK_N - diag, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, group):
        h = hk * group + g
        for start_m in range(lo, q_len, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < q_len
            md_ok = m_ok[:, None] & d_ok[None, :]
            rows = q_start + offs_m
            q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=md_ok, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                         mask=md_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + h * total_q + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + h * total_q + rows, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (M, N)
            visible = col_ok[None, :]
            if IS_CAUSAL:
                visible = visible & ((offs_n[None, :] <= offs_m[:, None] + diag)
                                     | (offs_n[None, :] < n_prefix))
            p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(DQ_ACC + rows[:, None] * (n_heads * head_dim) + h * head_dim
                              + offs_d[None, :], dq, mask=md_ok)
    dk = dk * scale
    tl.store(DK + (k_start + offs_n)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + (k_start + offs_n)[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KEEP,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    total_q, n_heads, group, head_dim, n_prefix, scale, scale_log2,
    IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    q_start = tl.load(CU_Q + b).to(tl.int64)
    q_len = tl.load(CU_Q + b + 1).to(tl.int64) - q_start
    k_start = tl.load(CU_K + b).to(tl.int64)
    k_len = tl.load(CU_K + b + 1).to(tl.int64) - k_start
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    md_ok = m_ok[:, None] & d_ok[None, :]
    rows = q_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + h * total_q + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + h * total_q + rows, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + diag, n_prefix))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < k_len
        dn_ok = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(K + (k_start + offs_n)[None, :] * stride_kt + hk * stride_kh + offs_d[:, None],
                     mask=dn_ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(V + (k_start + offs_n)[None, :] * stride_vt + hk * stride_vh + offs_d[:, None],
                     mask=dn_ok, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        visible = n_ok[None, :]
        if HAS_KEEP:
            keep = tl.load(KEEP + k_start + offs_n, mask=n_ok, other=0)
            visible = visible & (keep != 0)[None, :]
        if IS_CAUSAL:
            visible = visible & ((offs_n[None, :] <= offs_m[:, None] + diag)
                                 | (offs_n[None, :] < n_prefix))
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_ok)


def _bwd_blocks(head_dim: int, dtype: torch.dtype, interpret: bool | None = None):
    """((BLOCK_M, BLOCK_N) of dK/dV, (BLOCK_M, BLOCK_N) of dQ, num_warps, num_stages)."""
    if interpreting() if interpret is None else interpret:
        return (16, 16), (16, 16), 4, 1
    d = block_d(head_dim)
    if dtype == torch.float32:  # IEEE FMA dots, unrolled per thread: the tiles shrink as the head grows
        m = 32 if d <= 64 else 16
        return (m, 32), (m, 32), 4, 1
    warps = 4 if d <= 64 else 8
    if d <= 128:
        return (32, 128), (128, 32), warps, 2
    # BLOCK_D 256: halved tiles keep the shared memory within A100's 163 KiB (the tiles above need
    # 240 KiB for dK/dV on sm_80 and sm_90, 168 KiB for dQ on sm_80).
    return (32, 64), (64, 32), warps, 2


def _configs(head_dim: int, dtype: torch.dtype, causal: bool, has_keep: bool, deterministic: bool,
             interpret: bool | None = None) -> tuple[dict, dict]:
    """Launch constants of the dK/dV kernel and of the dQ kernel."""
    interpret = interpreting() if interpret is None else interpret
    (bm1, bn1), (bm2, bn2), warps, stages = _bwd_blocks(head_dim, dtype, interpret)
    common = dict(IS_CAUSAL=causal, HAS_KEEP=has_keep, UPCAST=interpret, BLOCK_D=block_d(head_dim),
                  DOT_PRECISION=dot_precision(dtype), num_warps=warps, num_stages=stages)
    return (dict(common, ATOMIC_DQ=not deterministic, BLOCK_M=bm1, BLOCK_N=bn1),
            dict(common, BLOCK_M=bm2, BLOCK_N=bn2))


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launcher can launch on a GPU: each dtype and BLOCK_D with causal
    masking, a key mask and (dK/dV) the atomic dQ on, then each switch off once."""
    def specs_for(head_dim, dtype, causal=True, has_keep=True, deterministic=False):
        dkdv, dq = _configs(head_dim, dtype, causal, has_keep, deterministic, interpret=False)
        out = []
        for kernel, cfg, names in ((_attn_bwd_dkdv_kernel, dkdv, "Q K V DO LSE DELTA DK DV DQ_ACC CU_Q CU_K KEEP"),
                                   (_attn_bwd_dq_kernel, dq, "Q K V DO LSE DELTA DQ CU_Q CU_K KEEP")):
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            out.append(LaunchSpec(kernel, attention_pointers(names, dtype, has_keep), cfg, warps, stages,
                                  floats=("scale", "scale_log2")))
        return out

    specs = [s for dtype in GPU_DTYPES for d in head_dims() for s in specs_for(d, dtype)]
    specs += specs_for(128, torch.bfloat16, causal=False)
    specs += specs_for(128, torch.bfloat16, has_keep=False)
    return specs + specs_for(128, torch.bfloat16, deterministic=True)[:1]  # dQ has no ATOMIC_DQ switch


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, keep: torch.Tensor | None,
    n_prefix: int, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
    deterministic: bool, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
) -> None:
    """Shapes as in attention_fwd; dq like q, dk/dv like k. Writes dq, dk, dv."""
    total_q, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    batch = cu_q.numel() - 1
    if batch == 0 or k.shape[0] == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    # delta_i = dO_i . O_i, float32, laid out (Hq, total_q) like lse.
    delta = (grad_out.float() * out.float()).sum(-1).t().contiguous()
    cfg1, cfg2 = _configs(head_dim, q.dtype, causal, keep is not None, deterministic)
    keep_arg = keep if keep is not None else cu_k
    dq_acc = None if deterministic else torch.zeros((total_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, cfg1["BLOCK_N"]), batch * n_kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, dq_acc if dq_acc is not None else delta,
        cu_q, cu_k, keep_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total_q, n_heads, n_kv_heads, group, head_dim, n_prefix, scale, scale * LOG2E, **cfg1,
    )
    if dq_acc is not None:
        dq.copy_(dq_acc)
        return
    if max_seqlen_q == 0:
        return
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, cfg2["BLOCK_M"]), batch * n_heads)](
        q, k, v, grad_out, lse, delta, dq, cu_q, cu_k, keep_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
        total_q, n_heads, group, head_dim, n_prefix, scale, scale * LOG2E, **cfg2,
    )
