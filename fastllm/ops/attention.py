"""Scaled dot-product attention for training and prefill.

Layout follows FlashAttention: q (B, T, Hq, D), k/v (B, S, Hkv, D) with Hq % Hkv == 0
(grouped-query attention without repeating K/V), or packed variable-length batches
q (total_q, Hq, D), k/v (total_k, Hkv, D) with cumulative offsets cu_seqlens (B+1,) int32.

Layers, top to bottom: references -> checks -> registered ops `torch.ops.fastllm.attention`
and `torch.ops.fastllm.attention_backward` (backend choice, fake implementations, autograd) ->
functional `attention()`. Backends: reference (plain PyTorch, below), triton
(triton_kernels/attention_fwd.py, attention_bwd.py: the GPU path) and native
(csrc/cpu/attention.cpp: the CPU path). Every call is first brought to one packed layout
(fastllm/ops/_attention_layout.py), so both kernels handle padded, variable-length, prefix
and GQA calls the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend
from ._attention_layout import check_cu_seqlens, pack, unpack_kv_grad
from ._checks import check_dtype, check_same_device, check_shape, check_tensor


def _masked_scores(q, k, v, causal, softmax_scale, key_padding_mask, prefix_k, prefix_v):
    """scores (B, Hq, T, P+S) with -inf where a key is not visible, and values (B, P+S, Hq, D)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = Hq // Hkv
    kk = k.repeat_interleave(group, dim=2)  # (B, S, Hq, D)
    vv = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk) * scale  # (B, Hq, T, S)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril(S - T)
    mask = mask.expand(B, 1, T, S)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    if prefix_k is not None:
        P = prefix_k.shape[1]
        pk = prefix_k.repeat_interleave(group, dim=2)
        pv = prefix_v.repeat_interleave(group, dim=2)
        scores = torch.cat([torch.einsum("bthd,bshd->bhts", q, pk) * scale, scores], dim=-1)
        mask = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool, device=q.device), mask], dim=-1)
        vv = torch.cat([pv, vv], dim=1)
    return scores.masked_fill(~mask, float("-inf")), vv


def _upcast(tensors, dtype, upcast):
    if upcast and dtype != torch.float64:
        return [None if t is None else t.float() for t in tensors]
    return list(tensors)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    upcast: bool = True,
) -> Tensor:
    """Plain attention on padded batches. q: (B, T, Hq, D); k, v: (B, S, Hkv, D).

    key_padding_mask: (B, S) bool, True where the key is real.
    prefix_k/prefix_v: (B, P, Hkv, D): P extra keys every query attends to (prefix tuning);
    they come before the S keys and are never masked. Causal masking aligns the last query
    with the last key (query i sees keys j <= i + S - T), as FlashAttention does.
    Returns (B, T, Hq, D) in q's dtype; with upcast=False it computes in q's own dtype
    (the low-precision baseline of the test rule).
    """
    dtype = q.dtype
    q, k, v, prefix_k, prefix_v = _upcast((q, k, v, prefix_k, prefix_v), dtype, upcast)
    scores, vv = _masked_scores(q, k, v, causal, softmax_scale, key_padding_mask, prefix_k, prefix_v)
    probs = torch.softmax(scores, dim=-1)
    # A query with no visible key (fully padded row) gets zeros instead of NaN.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, vv)
    return out.to(dtype)


def attention_lse_reference(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """log(sum_j exp(s_ij)) over the visible keys, (B, Hq, T) in float32 (float64 for float64);
    +inf for a query that sees no key, the convention the kernels store for the backward."""
    dtype = q.dtype
    kwargs = dict(kwargs)
    upcast = kwargs.pop("upcast", True)
    pk, pv = kwargs.pop("prefix_k", None), kwargs.pop("prefix_v", None)
    q, k, v, pk, pv = _upcast((q, k, v, pk, pv), dtype, upcast)
    scores, _ = _masked_scores(q, k, v, kwargs.get("causal", False), kwargs.get("softmax_scale"),
                               kwargs.get("key_padding_mask"), pk, pv)
    lse = torch.logsumexp(scores, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def attention_varlen_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
    prefix_k: Tensor | None = None, prefix_v: Tensor | None = None, **kwargs
) -> Tensor:
    """Packed batches: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence i occupies rows
    cu_seqlens[i]:cu_seqlens[i+1] and attends only within itself (and to its own prefix
    prefix_k[i], prefix_v[i] when given, (B, P, Hkv, D))."""
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        pre = {} if prefix_k is None else {"prefix_k": prefix_k[i:i + 1], "prefix_v": prefix_v[i:i + 1]}
        outs.append(attention_reference(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **pre, **kwargs)[0])
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)


def attention_varlen_lse_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, prefix_k=None, prefix_v=None,
                                   **kwargs) -> Tensor:
    """(Hq, total_q) log-sum-exp of the packed layout (see attention_lse_reference)."""
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        pre = {} if prefix_k is None else {"prefix_k": prefix_k[i:i + 1], "prefix_v": prefix_v[i:i + 1]}
        outs.append(attention_lse_reference(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **pre, **kwargs)[0])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not outs:
        return torch.empty((q.shape[1], 0), dtype=acc, device=q.device)
    return torch.cat(outs, dim=1).to(acc)


def attention_backward_reference(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                                 softmax_scale: float | None = None, key_padding_mask: Tensor | None = None,
                                 prefix_k: Tensor | None = None, prefix_v: Tensor | None = None):
    """Closed-form gradients of attention_reference (padded layout), in float32 (float64 for
    float64). With P = softmax(S) over visible keys and O = P V:
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q
    summed over the query heads that share a key/value head. Returns (dq, dk, dv, dprefix_k,
    dprefix_v) in the inputs' dtypes (the prefix ones None without a prefix)."""
    dtype = q.dtype
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    P = 0 if prefix_k is None else prefix_k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dy, q, k, v, pk, pv = _upcast((grad_out, q, k, v, prefix_k, prefix_v), dtype, True)
    scores, vv = _masked_scores(q, k, v, causal, scale, key_padding_mask, pk, pv)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # (B, Hq, T, P+S)
    kk = k if pk is None else torch.cat([pk, k], dim=1)
    kk = kk.repeat_interleave(group, dim=2)  # (B, P+S, Hq, D)
    out = torch.einsum("bhts,bshd->bthd", probs, vv)
    dvv = torch.einsum("bhts,bthd->bshd", probs, dy)
    dp = torch.einsum("bthd,bshd->bhts", dy, vv)
    ds = probs * (dp - (dy * out).sum(-1).transpose(1, 2)[..., None])
    dq = torch.einsum("bhts,bshd->bthd", ds, kk) * scale
    dkk = torch.einsum("bhts,bthd->bshd", ds, q) * scale

    def fold(g):  # (B, P+S, Hq, D) -> sum over each group of query heads -> (B, P+S, Hkv, D)
        return g.view(B, P + S, Hkv, group, D).sum(3)

    dkk, dvv = fold(dkk), fold(dvv)
    dk, dv = dkk[:, P:].to(dtype), dvv[:, P:].to(dtype)
    dpk = dpv = None
    if P:
        dpk, dpv = dkk[:, :P].to(dtype), dvv[:, :P].to(dtype)
    return dq.to(dtype), dk, dv, dpk, dpv


# --------------------------------------------------------------------------- checks


def _check(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
        check_dtype(t, name)
    for t, name in ((k, "k"), (v, "v")):
        check_same_device(q, "q", t, name)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    packed = cu_seqlens is not None
    dims = 3 if packed else 4
    layout = "(total, H, D) with cu_seqlens" if packed else "(B, T, H, D)"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != dims:
            raise ValueError(f"{name}: expected a {dims}-D tensor {layout}, got shape {list(t.shape)}")
    check_shape(v, "v", tuple(k.shape), "same as k")
    D, Hq, Hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"k: expected head dim {D} (same as q), got shape {list(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {Hq}, got {Hkv}")
    if packed:
        check_tensor(cu_seqlens, "cu_seqlens")
        check_same_device(q, "q", cu_seqlens, "cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor (B+1,), got shape "
                             f"{list(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k: expected {q.shape[0]} rows (same as q: packed self-attention "
                             f"shares cu_seqlens), got shape {list(k.shape)}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask: expected None with cu_seqlens (packed rows have no padding)")
        B = cu_seqlens.shape[0] - 1
    else:
        B, S = q.shape[0], k.shape[1]
        if k.shape[0] != B:
            raise ValueError(f"k: expected batch {B} (same as q), got shape {list(k.shape)}")
        if key_padding_mask is not None:
            check_tensor(key_padding_mask, "key_padding_mask")
            check_same_device(q, "q", key_padding_mask, "key_padding_mask")
            check_shape(key_padding_mask, "key_padding_mask", (B, S), "(batch, keys)")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k, prefix_v: expected both or neither, got only "
                         f"{'prefix_k' if prefix_v is None else 'prefix_v'}")
    if prefix_k is not None:
        for t, name in ((prefix_k, "prefix_k"), (prefix_v, "prefix_v")):
            check_tensor(t, name)
            check_same_device(q, "q", t, name)
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
                raise ValueError(f"{name}: expected shape [{B}, P, {Hkv}, {D}], got {list(t.shape)}")
        check_shape(prefix_v, "prefix_v", tuple(prefix_k.shape), "same as prefix_k")


def _choose(q: Tensor, backend: str) -> str:
    chosen = _backend.choose("attention", q.device, backend, native_op="attention_fwd",
                             cuda_order=("triton",))
    if chosen == "triton" and q.dtype == torch.float64:
        if backend == "triton" or (backend == "auto" and _backend.env_backend() == "triton"):
            raise RuntimeError("attention: backend 'triton' supports float32, bfloat16 and float16, got float64")
        return "reference"
    return chosen


def _contig_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- registered ops


def _reference_forward(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, causal, scale):
    kw = dict(causal=causal, softmax_scale=scale, prefix_k=prefix_k, prefix_v=prefix_v)
    if cu_seqlens is not None:
        return attention_varlen_reference(q, k, v, cu_seqlens, cu_seqlens, **kw)
    return attention_reference(q, k, v, key_padding_mask=key_padding_mask, **kw)


def _reference_lse(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, causal, scale):
    kw = dict(causal=causal, softmax_scale=scale, prefix_k=prefix_k, prefix_v=prefix_v)
    if cu_seqlens is not None:
        return attention_varlen_lse_reference(q, k, v, cu_seqlens, cu_seqlens, **kw)
    lse = attention_lse_reference(q, k, v, key_padding_mask=key_padding_mask, **kw)  # (B, Hq, T)
    return lse.permute(1, 0, 2).reshape(q.shape[2], -1)


def _reference_backward(grad_out, q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, causal, scale):
    kw = dict(causal=causal, softmax_scale=scale)
    if cu_seqlens is None:
        return attention_backward_reference(grad_out, q, k, v, key_padding_mask=key_padding_mask,
                                            prefix_k=prefix_k, prefix_v=prefix_v, **kw)
    parts = []
    for i in range(cu_seqlens.numel() - 1):
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        pre = {} if prefix_k is None else {"prefix_k": prefix_k[i:i + 1], "prefix_v": prefix_v[i:i + 1]}
        parts.append(attention_backward_reference(grad_out[None, s:e], q[None, s:e], k[None, s:e],
                                                  v[None, s:e], **pre, **kw))
    dq = torch.cat([q.new_zeros((0,) + q.shape[1:])] + [g[0][0] for g in parts])
    dk = torch.cat([k.new_zeros((0,) + k.shape[1:])] + [g[1][0] for g in parts])
    dv = torch.cat([v.new_zeros((0,) + v.shape[1:])] + [g[2][0] for g in parts])
    if prefix_k is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, torch.cat([g[3] for g in parts]), torch.cat([g[4] for g in parts])


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastllm::attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, prefix_k: Tensor | None,
    prefix_v: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int, causal: bool,
    softmax_scale: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (out like q, lse (Hq, total_q) float32: the log-sum-exp saved for the backward)."""
    _check(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens)
    if cu_seqlens is not None:  # every backend: the reference alone would index past the end
        check_cu_seqlens(cu_seqlens, q.shape[0], k.shape[0], max_seqlen)
    args = (q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, causal, softmax_scale)
    chosen = _choose(q, backend)
    if chosen == "reference":
        return _reference_forward(*args).contiguous(), _reference_lse(*args).to(_lse_dtype(q)).contiguous()
    p = pack(_contig_last(q), _contig_last(k), _contig_last(v), key_padding_mask, prefix_k, prefix_v,
             cu_seqlens, max_seqlen)
    if chosen == "native":
        out, lse = torch.ops.fastllm.attention_fwd(p.q.contiguous(), p.k.contiguous(), p.v.contiguous(), p.cu_q,
                                                   p.cu_k, p.keep, p.n_prefix, causal, softmax_scale)
    else:
        from fastllm.triton_kernels.attention_fwd import attention_fwd

        out = _backend.new_output(p.q.shape, dtype=q.dtype, device=q.device)
        lse = _backend.new_output((q.shape[-2], p.q.shape[0]), dtype=torch.float32, device=q.device)
        attention_fwd(p.q, p.k, p.v, p.cu_q, p.cu_k, p.keep, p.n_prefix, p.max_q, causal, softmax_scale, out, lse)
    return out.view(q.shape), lse


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, max_seqlen, causal, softmax_scale,
      deterministic, backend):
    _check(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens)
    rows = q.numel() // (q.shape[-1] * q.shape[-2]) if q.shape[-1] * q.shape[-2] else 0
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[-2], rows), dtype=_lse_dtype(q)))


@torch.library.custom_op("fastllm::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, prefix_k: Tensor | None, prefix_v: Tensor | None,
    cu_seqlens: Tensor | None, max_seqlen: int, causal: bool, softmax_scale: float,
    deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d prefix_k, d prefix_v); the prefix gradients are empty (0,)
    tensors when there is no prefix."""
    chosen = _choose(q, backend)
    grad_out = grad_out.to(q.dtype)
    no_prefix = q.new_empty(0)
    if chosen == "reference":
        grads = _reference_backward(grad_out, q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens,
                                    causal, softmax_scale)
        if prefix_k is None:
            grads = (*grads[:3], no_prefix, q.new_empty(0))
        # Copies: the op's outputs must not alias each other (the prefix and key gradients
        # are slices of one tensor in the reference).
        return tuple(g.clone(memory_format=torch.contiguous_format) for g in grads)
    p = pack(_contig_last(q), _contig_last(k), _contig_last(v), key_padding_mask, prefix_k, prefix_v,
             cu_seqlens, max_seqlen)
    go = grad_out.reshape(p.q.shape)
    o = out.reshape(p.q.shape)
    if chosen == "native":
        dq, dk, dv = torch.ops.fastllm.attention_bwd(go.contiguous(), p.q.contiguous(), p.k.contiguous(),
                                                     p.v.contiguous(), o.contiguous(), lse,
                                                     p.cu_q, p.cu_k, p.keep, p.n_prefix, causal,
                                                     softmax_scale)
    else:
        from fastllm.triton_kernels.attention_bwd import attention_bwd

        dq = _backend.new_output(p.q.shape, dtype=q.dtype, device=q.device)
        dk = _backend.new_output(p.k.shape, dtype=q.dtype, device=q.device)
        dv = _backend.new_output(p.v.shape, dtype=q.dtype, device=q.device)
        attention_bwd(_contig_last(go), p.q, p.k, p.v, o, lse, p.cu_q, p.cu_k, p.keep, p.n_prefix, p.max_q,
                      p.max_k, causal, softmax_scale, deterministic, dq, dk, dv)
    pshape = None if prefix_k is None else prefix_k.shape
    dk, dpk = unpack_kv_grad(p, dk, k.shape, pshape)
    dv, dpv = unpack_kv_grad(p, dv, k.shape, pshape)
    dpk = no_prefix if dpk is None else dpk.contiguous()
    dpv = q.new_empty(0) if dpv is None else dpv.contiguous()
    return dq.view(q.shape), dk.contiguous(), dv.contiguous(), dpk, dpv


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, prefix_k, prefix_v, cu_seqlens, max_seqlen, causal,
      softmax_scale, deterministic, backend):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    no_prefix = q.new_empty(0)
    return (like(q), like(k), like(v), no_prefix if prefix_k is None else like(prefix_k),
            q.new_empty(0) if prefix_v is None else like(prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, max_seqlen, causal, scale, det, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, prefix_k, prefix_v, cu_seqlens)
    ctx.args = (max_seqlen, causal, scale, det, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, prefix_k, prefix_v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = torch.ops.fastllm.attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, prefix_k, prefix_v, cu_seqlens, *ctx.args)
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, None, dpk, dpv, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """Fake implementations of the C++ kernels, so opcheck and torch.compile can trace them."""
    from fastllm import _extension

    if not _extension.available() or not hasattr(torch.ops.fastllm, "attention_fwd"):
        return

    @torch.library.register_fake("fastllm::attention_fwd")
    def _(q, k, v, cu_q, cu_k, keep, n_prefix, causal, scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))

    @torch.library.register_fake("fastllm::attention_bwd")
    def _(grad_out, q, k, v, out, lse, cu_q, cu_k, keep, n_prefix, causal, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> Tensor:
    """Attention entry point used by the models (see module docstring for layouts).

    q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D); or packed q/k/v (total, H, D) with
    cu_seqlens (B+1,) int32 offsets shared by q, k and v (self-attention over packed
    documents: no row attends across documents) -> (total, Hq, D). max_seqlen: the longest
    sequence, at least (computed from cu_seqlens when None, which reads it back to the host).
    For generation prefill with a KV cache, pass the cached keys in k/v (S > T): causal
    alignment is bottom-right, so new query i sees the cache and the new keys up to itself.
    causal: query i sees keys j <= i + S - T. key_padding_mask (B, S) bool, True = real key.
    prefix_k/prefix_v (B, P, Hkv, D): keys every query sees (prefix tuning), gradients flow.
    softmax_scale: default 1/sqrt(D). deterministic: a backward whose result does not depend
    on the order of parallel additions (Triton: a separate dQ pass instead of atomics).
    backend: None (auto, or FASTLLM_BACKEND), "reference", "triton" or "native".
    """
    _check(q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.bool()
    out, _ = torch.ops.fastllm.attention(
        q, k, v, key_padding_mask, prefix_k, prefix_v, cu_seqlens, int(max_seqlen or 0), bool(causal),
        scale, bool(deterministic), backend or "auto")
    return out
