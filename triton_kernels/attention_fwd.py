"""Flash attention forward in Triton (online softmax; the T x S score matrix never exists).

Every call is brought to one packed layout by the launcher in fastllm/ops/attention.py:
q (total_q, Hq, D), k/v (total_k, Hkv, D), sequence b owns rows cu_q[b]:cu_q[b+1] of q and
cu_k[b]:cu_k[b+1] of k/v. Padded batches use cu = arange(B+1) * length; prefix keys (prefix
tuning) are the first `n_prefix` keys of every sequence; a key padding mask becomes a per-key
byte `keep` (total_k,).

For query i and key j of one sequence (q_len queries, k_len keys):
    visible(i, j) = keep[j] and (not causal or j < n_prefix or j <= i + k_len - q_len)
    s_ij = scale * q_i . k_j                       (masked to -inf where not visible)
    m_i  = max_j s_ij,  l_i = sum_j exp(s_ij - m_i)
    o_i  = sum_j exp(s_ij - m_i) v_j / l_i,   lse_i = m_i + log(l_i)
A query that sees no key gets o_i = 0 and lse_i = +inf (so exp(s - lse) = 0 in the backward).

Grid: (query blocks of the longest sequence, B * Hq). Query head h reads key/value head
h // (Hq / Hkv): grouped-query attention without repeating K/V. Softmax runs in base 2
(exp2 with log2(e) folded into the scale). Accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import GPU_DTYPES, LaunchSpec, interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # a larger head would not fit the shared memory of one program


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, KEEP,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, n_heads, group, head_dim, n_prefix, scale_log2,
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
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K_head = K + hk * stride_kh
    V_head = V + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len  # causal: query i sees keys j <= i + diag (bottom-right aligned)
    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + diag, n_prefix))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < k_len
        kt = tl.load(K_head + (k_start + offs_n)[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(V_head + (k_start + offs_n)[:, None] * stride_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        visible = n_ok[None, :]
        if HAS_KEEP:
            keep = tl.load(KEEP + k_start + offs_n, mask=n_ok, other=0)
            visible = visible & (keep != 0)[None, :]
        if IS_CAUSAL:
            visible = visible & ((offs_n[None, :] <= offs_m[:, None] + diag)
                                 | (offs_n[None, :] < n_prefix))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Until a row has seen a visible key its max is -inf; shift by 0 instead (no NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    tl.store(OUT + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * total_q + q_start + offs_m, lse, mask=m_ok)


def block_sizes(head_dim: int, dtype: torch.dtype, interpret: bool | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward.

    float32 products are IEEE (FMA units, no tensor cores), unrolled per thread: BLOCK_M halves
    each time BLOCK_D doubles past 64, so one program's dot (BLOCK_M * BLOCK_N * BLOCK_D) stays
    the size of head dim 64 (larger ones spill registers and take minutes to compile). At
    BLOCK_D 256, bf16/fp16 K/V tiles of 32 keys in 2 stages keep the shared memory within A100's
    163 KiB (64 keys in 3 stages need 208 KiB on sm_80 and 256 KiB on sm_90)."""
    if interpreting() if interpret is None else interpret:
        return 16, 16, 4, 1
    d = block_d(head_dim)
    if dtype == torch.float32:
        return 64 * 64 // max(d, 64), 32, 4, 2
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 3
    return 128, 32, 8, 2


def block_d(head_dim: int) -> int:
    """BLOCK_D of the forward and backward kernels: head_dim padded to a power of two >= 16."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q: the Triton attention kernels support head dim up to {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def head_dims() -> list[int]:
    """One head dim per BLOCK_D the kernels can be launched with (16, 32, ..., MAX_HEAD_DIM)."""
    return [d for d in (2 ** i for i in range(4, 16)) if d <= MAX_HEAD_DIM]


def _config(head_dim: int, dtype: torch.dtype, causal: bool, has_keep: bool, interpret: bool | None = None) -> dict:
    """Launch constants of the forward kernel."""
    interpret = interpreting() if interpret is None else interpret
    block_m, block_n, warps, stages = block_sizes(head_dim, dtype, interpret)
    return dict(IS_CAUSAL=causal, HAS_KEEP=has_keep, UPCAST=interpret, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d(head_dim), DOT_PRECISION=dot_precision(dtype), num_warps=warps, num_stages=stages)


def attention_pointers(names: str, dtype: torch.dtype, has_keep: bool) -> dict:
    """Pointer arguments -> element dtype as the launchers pass them: tensors of q's dtype,
    float32 lse/delta/dq accumulator, int32 cu_seqlens, int8 keep (cu_k in its place without one)."""
    kinds = {"LSE": torch.float32, "DELTA": torch.float32, "DQ_ACC": torch.float32, "CU_Q": torch.int32,
             "CU_K": torch.int32, "KEEP": torch.int8 if has_keep else torch.int32}
    return {name: kinds.get(name, dtype) for name in names.split()}


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launcher can launch on a GPU: each dtype and BLOCK_D with causal
    masking and a key mask on, then each of the two off once."""
    def spec(head_dim, dtype, causal=True, has_keep=True):
        cfg = _config(head_dim, dtype, causal, has_keep, interpret=False)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        return LaunchSpec(_attn_fwd_kernel, attention_pointers("Q K V OUT LSE CU_Q CU_K KEEP", dtype, has_keep),
                          cfg, warps, stages, floats=("scale_log2",))

    specs = [spec(d, dtype) for dtype in GPU_DTYPES for d in head_dims()]
    return specs + [spec(128, torch.bfloat16, causal=False), spec(128, torch.bfloat16, has_keep=False)]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE float32 products (tests compare them tightly); TF32 would
    trade that accuracy for speed without the caller asking."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    keep: torch.Tensor | None, n_prefix: int, max_seqlen_q: int, causal: bool, scale: float,
    out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """q, out: (total_q, Hq, D); k, v: (total_k, Hkv, D), last dim contiguous; cu_q, cu_k:
    (B+1,) int32; keep: (total_k,) int8 or None; lse: (Hq, total_q) float32. Writes out, lse."""
    total_q, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    batch = cu_q.numel() - 1
    cfg = _config(head_dim, q.dtype, causal, keep is not None)
    if batch == 0 or max_seqlen_q == 0:
        return
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch * n_heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, keep if keep is not None else cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        total_q, n_heads, group, head_dim, n_prefix, scale * LOG2E, **cfg,
    )
