"""Cross-entropy and per-token log-prob/entropy rows in Triton, for one chunk of logits.

The chunked matmuls around these kernels stay in torch (fastllm.ops.linear_cross_entropy);
the kernels do the row-wise work and write the gradient of the chunk in place, over the
logits, so no second (rows, V) buffer exists. One program per row walks V in BLOCK_V tiles:
pass 1 keeps a running max m and sum s = sum exp(z - m) (online softmax), pass 2 writes
the gradient.

Cross-entropy (x = logits row, y = label, z = c*tanh(x/c) with soft cap c, else z = x):
    loss = (1-eps)(lse - z_y) + eps (lse - mean z) + zl lse^2
    dx_j = scale * (p_j (1 + 2 zl lse) - (1-eps)[j=y] - eps/V) * (1 - (z_j/c)^2)
Log-probs (z = x / T):
    logprob = z_y - lse,  entropy = lse - sum_j p_j z_j
    dx_j    = (g ([j=y] - p_j) - h p_j (z_j - E[z])) / T
Rows whose label is ignore_index: loss/logprob 0 and no gradient from that term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import ROW_DTYPES, LaunchSpec, acc_dtype, interpreting, pow2_blocks


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates to +-1 without overflow.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def _xent_rows_kernel(
    LOGITS, LABELS, ROW_SCALE, LOSS, LSE,  # LOGITS: (rows, V) with row stride; others (rows,)
    stride, n_cols, ignore_index, label_smoothing, z_loss, softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                tl.store(x_row + offs, tl.zeros([BLOCK_V], dtype=ACC).to(LOGITS.dtype.element_ty),
                         mask=offs < n_cols)
    else:
        m = tl.full([], float("-inf"), dtype=ACC)
        s = tl.zeros([], dtype=ACC)
        z_sum = tl.zeros([], dtype=ACC)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            z = _capped(tl.load(x_row + offs, mask=mask, other=0.0).to(ACC), softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(s)
        z_y = _capped(tl.load(x_row + label).to(ACC), softcap, HAS_SOFTCAP)
        loss = lse * (1.0 + z_loss * lse) - (1.0 - label_smoothing) * z_y
        if HAS_SMOOTHING:
            loss -= label_smoothing * z_sum / n_cols
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
        if COMPUTE_GRAD:
            scale = tl.load(ROW_SCALE + row).to(ACC)
            a = scale * (1.0 + 2.0 * z_loss * lse)
            b = scale * label_smoothing / n_cols
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                mask = offs < n_cols
                z = _capped(tl.load(x_row + offs, mask=mask, other=0.0).to(ACC), softcap, HAS_SOFTCAP)
                g = a * tl.exp(z - lse) - b
                g = tl.where(offs == label, g - scale * (1.0 - label_smoothing), g)
                if HAS_SOFTCAP:
                    t = z / softcap
                    g = g * (1.0 - t * t)
                tl.store(x_row + offs, g.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_stats(x_row, n_cols, inv_temperature, cols, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """(lse, E[z]) of z = x * inv_temperature, in one online pass:
    m = running max, s = sum exp(z - m), w = sum exp(z - m) z."""
    m = tl.full([], float("-inf"), dtype=ACC)
    s = tl.zeros([], dtype=ACC)
    w = tl.zeros([], dtype=ACC)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC) * inv_temperature
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.exp(z - m_new)
        alpha = tl.exp(m - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        w = w * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # e = 0 where masked
        m = m_new
    return m + tl.log(s), w / s


@triton.jit
def _logprob_rows_kernel(
    LOGITS, TARGETS, LOGPROB, ENTROPY,
    stride, n_cols, ignore_index, inv_temperature,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    lse, mean = _softmax_stats(x_row, n_cols, inv_temperature, tl.arange(0, BLOCK_V), BLOCK_V, ACC)
    tl.store(ENTROPY + row, lse - mean)
    if target == ignore_index:
        tl.store(LOGPROB + row, 0.0)
    else:
        z_y = tl.load(x_row + target).to(ACC) * inv_temperature
        tl.store(LOGPROB + row, z_y - lse)


@triton.jit
def _logprob_rows_bwd_kernel(
    LOGITS, TARGETS, GRAD_LOGPROB, GRAD_ENTROPY,
    stride, n_cols, ignore_index, inv_temperature,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)
    lse, mean = _softmax_stats(x_row, n_cols, inv_temperature, cols, BLOCK_V, ACC)
    g = tl.load(GRAD_LOGPROB + row).to(ACC)
    if target == ignore_index:
        g = g * 0.0
    h = tl.load(GRAD_ENTROPY + row).to(ACC)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC) * inv_temperature
        p = tl.exp(z - lse)
        d = -p * (g + h * (z - mean))
        d = tl.where(offs == target, d + g, d) * inv_temperature
        tl.store(x_row + offs, d.to(LOGITS.dtype.element_ty), mask=mask)


GPU_BLOCK_V = 4096  # on a GPU 4096 elements per tile keeps enough loads in flight (Liger uses up to 65536 / 32768)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _config(n_cols: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """BLOCK_V, ACC and num_warps of all three kernels for rows of n_cols logits of `dtype`.
    Under the interpreter a small tile keeps numpy's temporaries small."""
    cap = 128 if (interpreting() if interpret is None else interpret) else GPU_BLOCK_V
    block = min(cap, triton.next_power_of_2(max(n_cols, 1)))
    return dict(BLOCK_V=block, ACC=acc_dtype(dtype), num_warps=_warps(block))


def launch_configs() -> list[LaunchSpec]:
    """Every variant the launchers can launch on a GPU: each dtype and, for BLOCK_V, the ends of
    each warps bucket, with every feature switch on; then each switch off once at the largest block."""
    def xent(cfg, warps, dtype, softcap=True, smoothing=True, grad=True):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        pointers = {"LOGITS": dtype, "LABELS": torch.int64, **dict.fromkeys(["ROW_SCALE", "LOSS", "LSE"], acc)}
        flags = dict(HAS_SOFTCAP=softcap, HAS_SMOOTHING=smoothing, COMPUTE_GRAD=grad)
        return LaunchSpec(_xent_rows_kernel, pointers, {**cfg, **flags}, warps,
                          floats=("label_smoothing", "z_loss", "softcap"))

    specs = []
    for dtype in ROW_DTYPES:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for block in pow2_blocks(GPU_BLOCK_V, _warps):
            cfg = _config(block, dtype, interpret=False)
            warps = cfg.pop("num_warps")
            specs.append(xent(cfg, warps, dtype))
            rows = {"LOGITS": dtype, "TARGETS": torch.int64}
            specs.append(LaunchSpec(_logprob_rows_kernel, {**rows, "LOGPROB": acc, "ENTROPY": acc}, cfg, warps,
                                    floats=("inv_temperature",)))
            specs.append(LaunchSpec(_logprob_rows_bwd_kernel, {**rows, "GRAD_LOGPROB": acc, "GRAD_ENTROPY": acc},
                                    cfg, warps, floats=("inv_temperature",)))
    cfg = _config(GPU_BLOCK_V, torch.bfloat16, interpret=False)
    warps = cfg.pop("num_warps")
    specs += [xent(cfg, warps, torch.bfloat16, softcap=False), xent(cfg, warps, torch.bfloat16, smoothing=False),
              xent(cfg, warps, torch.bfloat16, grad=False)]
    return specs


def xent_rows_(logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, compute_grad: bool, *,
               loss: torch.Tensor, lse: torch.Tensor):
    """logits: (rows, V), unit stride along V (overwritten with the scaled gradient when
    compute_grad); labels: (rows,) int64; row_scale, loss, lse: (rows,) float32 (float64
    for float64 logits). Writes loss and lse and returns them."""
    rows, n_cols = logits.shape
    if rows > 0:
        _xent_rows_kernel[(rows,)](
            logits, labels, row_scale, loss, lse, logits.stride(0), n_cols, ignore_index,
            label_smoothing, z_loss, softcap if softcap > 0 else 1.0,
            HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad,
            **_config(n_cols, logits.dtype),
        )
    return loss, lse


def logprob_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, inv_temperature: float,
                 *, logprob: torch.Tensor, entropy: torch.Tensor):
    """logits: (rows, V); targets: (rows,) int64; logprob, entropy: (rows,) float32/64
    outputs. Writes and returns (logprob, entropy)."""
    rows, n_cols = logits.shape
    if rows > 0:
        _logprob_rows_kernel[(rows,)](
            logits, targets, logprob, entropy, logits.stride(0), n_cols, ignore_index, inv_temperature,
            **_config(n_cols, logits.dtype),
        )
    return logprob, entropy


def logprob_rows_bwd_(logits: torch.Tensor, targets: torch.Tensor, grad_logprob: torch.Tensor,
                      grad_entropy: torch.Tensor, ignore_index: int, inv_temperature: float) -> None:
    """Overwrites logits (rows, V) with the gradient of sum(g*logprob + h*entropy)."""
    rows, n_cols = logits.shape
    if rows > 0:
        _logprob_rows_bwd_kernel[(rows,)](
            logits, targets, grad_logprob, grad_entropy, logits.stride(0), n_cols, ignore_index,
            inv_temperature, **_config(n_cols, logits.dtype),
        )
