"""Cross-entropy from logits, and the references of the whole cross-entropy family.

For logits x (N, V) and labels y (N,), with z = c * tanh(x / c) when a soft cap c is given
(Gemma 2) and z = x otherwise, lse = log sum_j exp(z_j):

    loss_i = (1 - eps) * (lse_i - z_{i,y_i})      cross-entropy
           + eps * (lse_i - mean_j z_ij)          label smoothing eps (as F.cross_entropy)
           + z_loss * lse_i^2                     z-loss (PaLM)

Rows with y_i == ignore_index contribute 0. reduction "none" returns loss (N,); "sum" the
sum; "mean" the sum divided by num_tokens when given (gradient accumulation: pass the
number of valid tokens of the whole accumulated batch), else by the number of valid rows.
A batch whose rows are all ignored has mean loss 0 and a zero gradient (F.cross_entropy
returns NaN there). Losses are float32 (float64 for float64 inputs) whatever the input
dtype.

`cross_entropy()` never stores a softmax: the forward keeps only the per-row losses, and
the backward writes d loss / d logits in one pass into the buffer it returns.
The linear (logits-free) variant lives in linear_cross_entropy.py, per-token log-probs and
entropy in logprobs.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _xent_rows
from ._backend import new_output
from ._checks import check_dtype, check_tensor

REDUCTIONS = ("mean", "sum", "none")

# --------------------------------------------------------------------------- references


def cross_entropy_reference(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    num_tokens=None, upcast: bool = True,
) -> Tensor:
    """Plain PyTorch (autograd gives the gradients). logits: (..., V), labels: (...).
    upcast=False computes in the logits' own dtype (the low-precision baseline of the tests)."""
    z = logits.reshape(-1, logits.shape[-1])
    if upcast:
        z = z.to(_xent_rows.acc_dtype(logits.dtype))
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = torch.log_softmax(z, dim=-1)
    loss = -(1 - label_smoothing) * logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        loss = loss - label_smoothing * logp.mean(-1)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, dim=-1) ** 2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    out = reduce_loss(loss, valid, reduction, num_tokens)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, **kwargs
) -> Tensor:
    """The full logits hidden @ weight.T (+ bias), in float32 (float64 for float64), then
    cross_entropy_reference. hidden: (..., H), weight: (V, H), labels: (...)."""
    acc = _xent_rows.acc_dtype(hidden.dtype) if kwargs.get("upcast", True) else hidden.dtype
    logits = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    return cross_entropy_reference(logits, labels, **kwargs)


def reduce_loss(loss: Tensor, valid: Tensor, reduction: str, num_tokens=None) -> Tensor:
    """Per-row losses (N,) -> the reduction. mean divides by num_tokens, else by the valid
    rows, at least 1 (an all-ignored batch gives 0)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(valid, num_tokens, total.dtype)


def mean_denominator(valid: Tensor, num_tokens, dtype: torch.dtype) -> Tensor:
    if num_tokens is None:
        return valid.sum().to(dtype).clamp(min=1)
    if isinstance(num_tokens, Tensor):
        return num_tokens.to(device=valid.device, dtype=dtype).clamp(min=1)
    return torch.tensor(float(max(num_tokens, 1)), dtype=dtype, device=valid.device)


# --------------------------------------------------------------------------- checks


def check_loss_options(reduction: str, label_smoothing: float, z_loss: float, softcap, num_tokens) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss: expected a non-negative value, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a positive value, got {softcap}")
    if num_tokens is not None and not isinstance(num_tokens, Tensor) and not num_tokens > 0:
        raise ValueError(f"num_tokens: expected None or a positive count, got {num_tokens}")


def check_labels(labels: Tensor, name: str, rows_shape, n_classes: int, ignore_index: int) -> Tensor:
    """labels (...) integer with shape `rows_shape` -> (N,) int64. Values are range-checked
    off CUDA and outside torch.compile (on CUDA that would cost a device sync; the Triton
    kernels do not check there, the C++ CPU kernels always do)."""
    check_tensor(labels, name)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name}: expected an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"{name}: expected shape {list(rows_shape)}, got {list(labels.shape)}")
    flat = labels.reshape(-1).long()
    if flat.device.type != "cuda" and flat.numel() > 0 and not torch.compiler.is_compiling():
        valid = flat != ignore_index
        low, high = int(torch.where(valid, flat, 0).min()), int(torch.where(valid, flat, 0).max())
        if low < 0 or high >= n_classes:
            raise ValueError(f"{name}: expected values in [0, {n_classes}) or ignore_index "
                             f"{ignore_index}, got {low if low < 0 else high}")
    return flat.contiguous()


def row_scale(valid: Tensor, reduction: str, num_tokens, dtype: torch.dtype) -> Tensor:
    """d loss / d loss_i for each row: 1/denominator (mean) or 1 (sum); 0 for ignored rows."""
    scale = valid.to(dtype)
    if reduction == "mean":
        scale = scale / mean_denominator(valid, num_tokens, dtype)
    return scale


# --------------------------------------------------------------------------- registered ops


def _check_logits(logits: Tensor) -> None:
    check_tensor(logits, "logits")
    check_dtype(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [N, V], got {list(logits.shape)}")


@torch.library.custom_op("fastllm::cross_entropy_rows", mutates_args=())
def _cross_entropy_rows_op(
    logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, backend: str,
) -> Tensor:
    """Per-row losses (N,) of logits (N, V). The softmax is not kept."""
    chosen = _backend.choose("cross_entropy", logits.device, backend, native_op=_xent_rows.NATIVE_OP)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    scale = torch.zeros(x.shape[0], dtype=_xent_rows.acc_dtype(x.dtype), device=x.device)
    loss, _ = _xent_rows.xent_rows_(chosen, x, labels, scale, ignore_index, label_smoothing, z_loss,
                                    softcap, False)
    return loss


@_cross_entropy_rows_op.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend):
    return logits.new_empty(logits.shape[0], dtype=_xent_rows.acc_dtype(logits.dtype))


@torch.library.custom_op("fastllm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    grad_rows: Tensor, logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float, backend: str,
) -> Tensor:
    """d(sum_i grad_rows_i * loss_i) / d logits, (N, V): written in one pass over a copy of
    the logits, which becomes the gradient."""
    chosen = _backend.choose("cross_entropy", logits.device, backend, native_op=_xent_rows.NATIVE_OP)
    grad = new_output(logits.shape, dtype=logits.dtype, device=logits.device)
    grad.copy_(logits)
    scale = grad_rows.to(_xent_rows.acc_dtype(logits.dtype)).contiguous()
    _xent_rows.xent_rows_(chosen, grad, labels, scale, ignore_index, label_smoothing, z_loss, softcap, True)
    return grad


@_cross_entropy_backward_op.register_fake
def _(grad_rows, logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, *options = inputs
    ctx.save_for_backward(logits, labels)
    ctx.options = options


def _ce_backward(ctx, grad_rows):
    logits, labels = ctx.saved_tensors
    grad = torch.ops.fastllm.cross_entropy_backward(grad_rows, logits, labels, *ctx.options)
    return grad, None, None, None, None, None, None


_cross_entropy_rows_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)

# --------------------------------------------------------------------------- public API


def cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    num_tokens=None, backend: str | None = None,
) -> Tensor:
    """Fused cross-entropy of logits (..., V) against labels (...) (see the module
    docstring for the math and the options). Returns a float32 scalar, or (...) for
    reduction="none". backend: None (auto), "reference", "triton" or "native"."""
    _check_logits(logits.reshape(-1, logits.shape[-1]) if logits.dim() >= 1 else logits)
    check_loss_options(reduction, label_smoothing, z_loss, softcap, num_tokens)
    V = logits.shape[-1]
    flat_labels = check_labels(labels, "labels", logits.shape[:-1], V, ignore_index)
    rows = torch.ops.fastllm.cross_entropy_rows(
        logits.reshape(-1, V), flat_labels, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap or 0.0), backend or "auto")
    valid = flat_labels != ignore_index
    if reduction == "none":
        return rows.view(labels.shape)
    return reduce_loss(rows, valid, reduction, num_tokens)


def naive_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """F.cross_entropy in the logits' dtype: the baseline the benchmarks compare against."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
