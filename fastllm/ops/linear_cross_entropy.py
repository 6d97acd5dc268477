"""Linear cross-entropy without the logits: CE(hidden @ weight.T + bias, labels).

hidden (..., H), weight (V, H), bias (V,) or None, labels (...) int. The loss math, the
options (ignore_index, reduction, label_smoothing, z_loss, softcap, num_tokens) and the
all-ignored convention (mean loss 0, zero gradient) are those of cross_entropy.py.

The (N, V) logits never exist: rows go through in chunks (see _chunked.py). For
reduction "mean"/"sum" with gradients wanted, ONE pass does everything: each chunk's
logits are turned into their gradient in place by the row kernel, multiplied back into
grad_hidden and accumulated into grad_weight/grad_bias; the backward only scales those by
the incoming scalar gradient (Liger-Kernel's fused linear cross-entropy does the same).
For reduction "none" (any per-row weighting) and for inference, the forward only computes
the per-row losses and the backward recomputes the chunks with each row's gradient.

MLM (`mlm_loss`): only masked positions carry a label; their rows are gathered before the
matmul, so the unmasked ~85% of the rows cost nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastllm.labels import IGNORE_INDEX

from . import _backend, _xent_rows
from ._backend import new_output
from ._checks import check_dtype, check_same_device, check_shape, check_tensor
from ._chunked import run_chunks
from .cross_entropy import check_labels, check_loss_options, reduce_loss, row_scale

# --------------------------------------------------------------------------- checks


def check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    check_dtype(hidden, "hidden")
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape [..., H], got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (H = the last dimension of "
                         f"hidden), got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (same as hidden), got {weight.dtype}")
    check_same_device(hidden, "hidden", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_shape(bias, "bias", (weight.shape[0],), "the rows of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (same as hidden), got {bias.dtype}")
        check_same_device(hidden, "hidden", bias, "bias")


def _loss_rows_fn(backend, labels, scale, loss, options, compute_grad):
    ignore_index, label_smoothing, z_loss, softcap = options

    def row_fn(logits, start, end):
        chunk_loss, _ = _xent_rows.xent_rows_(backend, logits, labels[start:end], scale[start:end],
                                              ignore_index, label_smoothing, z_loss, softcap, compute_grad)
        loss[start:end] = chunk_loss
    return row_fn


def _chunked_loss(hidden, weight, labels, bias, scale, options, chunk_size, needs, backend, compute_grad):
    """(loss rows (N,), grad_hidden, grad_weight, grad_bias) with row i's gradient scaled by scale[i]."""
    chosen = _backend.choose("linear_cross_entropy", hidden.device, backend, native_op=_xent_rows.NATIVE_OP)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    loss = new_output(hidden.shape[0], dtype=_xent_rows.acc_dtype(hidden.dtype), device=hidden.device)
    row_fn = _loss_rows_fn(chosen, labels, scale, loss, options, compute_grad)
    grads = run_chunks(hidden, weight, bias, chunk_size, row_fn,
                       need_hidden=needs[0], need_weight=needs[1], need_bias=needs[2], compute_grad=compute_grad,
                       backend=chosen)
    return (loss, *grads)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::linear_cross_entropy_fused", mutates_args=())
def _fused_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, row_scale: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss = sum_i row_scale_i * loss_i, and its gradients (computed in the same pass)."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    loss, gh, gw, gb = _chunked_loss(hidden, weight, labels, bias, row_scale, options, chunk_size,
                                     (need_hidden, need_weight, need_bias), backend, True)
    return (loss * row_scale).sum(), gh, gw, gb


@_fused_op.register_fake
def _(hidden, weight, labels, bias, row_scale, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, need_hidden, need_weight, need_bias, backend):
    loss = hidden.new_empty((), dtype=_xent_rows.acc_dtype(hidden.dtype))
    return (loss, *_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias))


def _fused_setup_context(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    # autograd would otherwise hand the backward zero-filled (V, H) and (N, H) gradients
    # for the gradient outputs, which nothing reads
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[3] is None else inputs[3].dtype)
    ctx.computed = inputs[10:13]  # need_hidden, need_weight, need_bias


def _fused_backward(ctx, grad_loss, *_):
    # The gradients were computed for d loss = 1; scale them by the incoming gradient. The
    # first call scales in place (a copy would hold a second (V, H) grad_weight at the
    # peak); a later call on a retained graph (gradcheck, retain_graph=True) rescales a copy
    # by new / first.
    if grad_loss is None:  # the loss itself was not used
        return (None,) * 14
    gh, gw, gb = ctx.saved_tensors
    dh, dw, db = ctx.dtypes
    first = getattr(ctx, "first_scale", None)
    if first is None:
        ctx.first_scale = grad_loss.detach().clone()
        # eager tensors only: under torch.compile / AOT tracing (tensor subclasses) the
        # functional form is traced and the compiler plans the memory
        factor, inplace = grad_loss, type(gw) is Tensor and type(gh) is Tensor
    else:
        if bool(first == 0):
            raise RuntimeError("linear_cross_entropy: a second backward through the fused path after a "
                               "zero gradient; use reduction='none' and reduce the rows yourself")
        factor, inplace = grad_loss / first, False
    out = [None] * 14
    for i, grad, dtype, computed in zip((0, 1, 3), (gh, gw, gb), (dh, dw, db), ctx.computed):
        if ctx.needs_input_grad[i] and computed:
            f = factor.to(grad.dtype)
            # .data: scaling the saved tensor must not bump its version (a retained graph
            # unpacks it again; the rescaling above accounts for the change)
            out[i] = (grad.data.mul_(f) if inplace else grad * f).to(dtype)
    return tuple(out)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("fastllm::linear_cross_entropy_rows", mutates_args=())
def _rows_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float, chunk_size: int, backend: str,
) -> Tensor:
    """Per-row losses (N,), chunk by chunk, no gradients."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    dummy = hidden.new_empty(hidden.shape[0], dtype=_xent_rows.acc_dtype(hidden.dtype))
    return _chunked_loss(hidden, weight, labels, bias, dummy, options, chunk_size, (False,) * 3, backend, False)[0]


@_rows_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend):
    return hidden.new_empty(hidden.shape[0], dtype=_xent_rows.acc_dtype(hidden.dtype))


@torch.library.custom_op("fastllm::linear_cross_entropy_backward", mutates_args=())
def _rows_backward_op(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows_i * loss_i, recomputing each chunk's logits."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    scale = grad_rows.to(_xent_rows.acc_dtype(hidden.dtype)).contiguous()
    return _chunked_loss(hidden, weight, labels, bias, scale, options, chunk_size,
                         (need_hidden, need_weight, need_bias), backend, True)[1:]


@_rows_backward_op.register_fake
def _(grad_rows, hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, need_hidden, need_weight, need_bias, backend):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _rows_setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, *options = inputs
    ctx.save_for_backward(hidden, weight, labels, bias)
    ctx.options = options


def _rows_backward(ctx, grad_rows):
    hidden, weight, labels, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    gh, gw, gb = torch.ops.fastllm.linear_cross_entropy_backward(
        grad_rows, hidden, weight, labels, bias, *ctx.options[:5], need[0], need[1],
        bias is not None and need[3], ctx.options[5])
    return (gh if need[0] else None, gw if need[1] else None, None,
            gb if bias is not None and need[3] else None) + (None,) * 6


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup_context)

# --------------------------------------------------------------------------- public API


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, num_tokens=None,
    chunk_size: int | None = None, backend: str | None = None,
) -> Tensor:
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, without the logits.

    hidden: (..., H); weight: (V, H) (the LM head / tied embedding); labels: (...) ints in
    [0, V) or ignore_index; bias: (V,) or None. Returns a float32 scalar (float64 for
    float64 inputs), or per-position losses shaped like labels for reduction="none".
    num_tokens: divide the "mean" by this (int or 0-dim tensor) instead of the number of
    valid labels, so micro-batches of a gradient-accumulation step add up to the mean
    over the whole batch. chunk_size: rows per chunk (default: `_chunked.default_chunk_size`;
    on the CPU at least 256 rows, and on the BLAS engine up to 1024 within a 256 MiB block).
    backend: None (auto), "reference", "triton" or "native".
    """
    check_linear(hidden, weight, bias)
    check_loss_options(reduction, label_smoothing, z_loss, softcap, num_tokens)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size: expected None or a positive integer, got {chunk_size}")
    H, V = hidden.shape[-1], weight.shape[0]
    flat_labels = check_labels(labels, "labels", hidden.shape[:-1], V, ignore_index)
    hidden2 = hidden.reshape(-1, H)  # (N, H)
    options = (int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
               int(chunk_size or 0))
    valid = flat_labels != ignore_index
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    if reduction != "none" and any(needs):
        scale = row_scale(valid, reduction, num_tokens, _xent_rows.acc_dtype(hidden.dtype))
        loss, *_ = torch.ops.fastllm.linear_cross_entropy_fused(
            hidden2, weight, flat_labels, bias, scale, *options, *needs, backend or "auto")
        return loss
    rows = torch.ops.fastllm.linear_cross_entropy_rows(hidden2, weight, flat_labels, bias, *options,
                                                       backend or "auto")
    if reduction == "none":
        return rows.view(labels.shape)
    return reduce_loss(rows, valid, reduction, num_tokens)


def next_token_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
    reduction: str = "mean", num_tokens=None, **kwargs,
) -> Tensor:
    """The next-token loss of a decoder: the one entry that models, PEFT wrappers, trainers and
    benches call. Labels follow fastllm.labels: already shifted, labels[..., t] is the target of
    position t (IGNORE_INDEX where no loss is taken), so hidden is never sliced or copied.

    hidden: (..., H) final hidden states; weight: (V, H) the LM head; labels: (...) ints.
    reduction: "mean" (over counted targets, or / num_tokens), "sum" or "none" (per position).
    The head runs in the activations' dtype (under autocast the hidden states are low precision
    while the weight stays float32). Other keyword arguments go to linear_cross_entropy.
    """
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return linear_cross_entropy(hidden, weight, labels, bias, ignore_index=IGNORE_INDEX, reduction=reduction,
                                num_tokens=num_tokens, **kwargs)


def mlm_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
    transform=None, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
    num_tokens=None, chunk_size: int | None = None, backend: str | None = None,
) -> Tensor:
    """Masked-LM loss, the one entry: cross-entropy on the positions whose label is not
    ignore_index (labels unshifted: the original token at each masked position).

    hidden: (..., H') encoder states; transform: the MLM head's transform (..., H') -> (..., H),
    applied to the masked rows only (None: identity); weight: (V, H), bias: (V,) or None;
    labels: (...). The masked rows are gathered first (one device sync for their count), so
    the unmasked ~85% cost nothing, then go through linear_cross_entropy. An all-ignored batch
    gives 0 (mean) with a zero gradient, like every loss here. reduction "none" returns a loss
    per position (0 where unmasked).
    """
    check_tensor(hidden, "hidden")
    V = weight.shape[0]
    check_labels(labels, "labels", hidden.shape[:-1], V, ignore_index)
    flat_labels = labels.reshape(-1).long()
    rows = torch.nonzero(flat_labels != ignore_index).squeeze(1)  # (M,)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (M, H')
    if transform is not None:
        picked = transform(picked)  # (M, H)
    if weight.dtype != picked.dtype:  # autocast: the head runs in the activations' dtype
        weight = weight.to(picked.dtype)
    if bias is not None and bias.dtype != picked.dtype:
        bias = bias.to(picked.dtype)
    check_linear(picked, weight, bias)
    loss = linear_cross_entropy(picked, weight, flat_labels.index_select(0, rows), bias,
                                ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, num_tokens=num_tokens,
                                chunk_size=chunk_size, backend=backend)
    if reduction != "none":
        return loss
    full = loss.new_zeros(flat_labels.shape[0]).index_copy(0, rows, loss)
    return full.view(labels.shape)


def mlm_loss_reference(hidden, weight, labels, bias=None, **kwargs) -> Tensor:
    """MLM loss from the full logits (the masking happens through ignore_index)."""
    from .cross_entropy import linear_cross_entropy_reference

    return linear_cross_entropy_reference(hidden, weight, labels, bias, **kwargs)
