"""Rotary position embedding in Triton: q and k of one token in one program.

    y1 = x1 * cos - x2 * sin,   y2 = x2 * cos + x1 * sin     (x1, x2: the two halves of a head)

The backward is the same kernel with INVERSE=True (sin negated). One program per token
loads that token's cos/sin row (D/2) once and rotates every q head and every k head with it,
as a (BLOCK_H, BLOCK_HALF) tile each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import ROW_DTYPES, LaunchSpec, acc_dtype, pow2_blocks, row_warps


@triton.jit
def _rotate_heads(
    X,
    Y,
    row,
    n_heads,
    half,
    c,
    s,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    ACC: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    offs = row * n_heads * 2 * half + heads * 2 * half + cols  # row is int64
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + offs + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,  # Q, QO: (n_tokens, n_q_heads, 2*half); K, KO: (n_tokens, n_k_heads, 2*half)
    COS,
    SIN,  # (n_tokens, half), float32 (float64 for float64 inputs)
    n_q_heads,
    n_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INVERSE: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    c = tl.load(COS + row * half + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    s = tl.load(SIN + row * half + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    if INVERSE:
        s = -s
    _rotate_heads(Q, QO, row, n_q_heads, half, c, s, BLOCK_HQ, BLOCK_HALF, ACC)
    _rotate_heads(K, KO, row, n_k_heads, half, c, s, BLOCK_HK, BLOCK_HALF, ACC)


# The sizes launch_configs() covers: head dims up to 256 (as attention) and up to 128 heads.
MAX_HALF = 128
MAX_HEADS = 128


def _config(n_q_heads: int, n_k_heads: int, half: int, dtype: torch.dtype, inverse: bool) -> dict:
    """Launch constants: one (heads, half) tile each for q and k, padded to powers of two."""
    block_half = triton.next_power_of_2(max(half, 1))
    block_hq = triton.next_power_of_2(max(n_q_heads, 1))
    return dict(BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(max(n_k_heads, 1)), BLOCK_HALF=block_half,
                INVERSE=inverse, ACC=acc_dtype(dtype), num_warps=row_warps(block_hq * block_half))


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launcher can launch on a GPU, up to MAX_HEADS heads of half width
    MAX_HALF: each dtype; for the q tile (heads x half) the ends of each warps bucket, with as
    many k heads as q heads (the largest k tile), inverse=True; and the forward once."""
    def spec(n_heads, n_k_heads, half, dtype, inverse):
        cfg = _config(n_heads, n_k_heads, half, dtype, inverse)
        warps = cfg.pop("num_warps")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        pointers = {**dict.fromkeys(["Q", "K", "QO", "KO"], dtype), "COS": acc, "SIN": acc}
        return LaunchSpec(_rope_kernel, pointers, cfg, warps)

    specs = []
    for dtype in ROW_DTYPES:
        for tile in pow2_blocks(MAX_HEADS * MAX_HALF, row_warps):
            half = min(tile, MAX_HALF)
            specs.append(spec(tile // half, tile // half, half, dtype, True))
    specs.append(spec(MAX_HEADS, 1, MAX_HALF, torch.bfloat16, False))
    return specs


def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    inverse: bool = False,
) -> None:
    """q, q_out: (N, Hq, D); k, k_out: (N, Hkv, D); cos, sin: (N, D/2); all contiguous.
    Writes the rotated q and k (inverse=True: rotated back) into q_out and k_out."""
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    if n_tokens == 0:
        return
    _rope_kernel[(n_tokens,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        n_q_heads,
        n_k_heads,
        head_dim // 2,
        **_config(n_q_heads, n_k_heads, head_dim // 2, q.dtype, inverse),
    )
