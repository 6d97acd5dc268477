"""Row kernels of the cross-entropy family, one call per chunk of logits, per backend.

Each works on a (rows, V) chunk with unit stride along V:
  xent_rows_(...)        -> (loss, lse); with compute_grad, overwrites the chunk with
                            row_scale * d loss / d logits
  logprob_rows(...)      -> (logprob of the target, entropy), at a temperature
  logprob_rows_bwd_(...) -> overwrites the chunk with d(sum g*logprob + h*entropy)/d logits

"native" calls the C++ kernels (csrc/cpu/cross_entropy.cpp), "triton" the Triton kernels
(triton_kernels/cross_entropy.py), "reference" the plain PyTorch below (closed-form
gradients; any device). Results are float32 (float64 for float64 logits). The math is in
the module docstring of triton_kernels/cross_entropy.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- PyTorch rows


def _capped(x: Tensor, softcap: float) -> Tensor:
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _xent_rows_torch(logits, labels, row_scale, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
    z = _capped(logits.to(acc_dtype(logits.dtype)), softcap)  # (rows, V)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    loss = lse * (1 + z_loss * lse) - (1 - label_smoothing) * z.gather(1, safe).squeeze(1)
    if label_smoothing > 0:
        loss = loss - label_smoothing * z.mean(-1)
    loss = torch.where(valid, loss, 0.0)
    lse = torch.where(valid, lse, 0.0)
    if compute_grad:
        g = torch.exp(z - lse.unsqueeze(1)) * (1 + 2 * z_loss * lse).unsqueeze(1) - label_smoothing / z.shape[1]
        g.scatter_add_(1, safe, torch.full_like(safe, -(1 - label_smoothing), dtype=g.dtype))
        if softcap > 0:
            g = g * (1 - (z / softcap) ** 2)
        g = torch.where(valid.unsqueeze(1), g * row_scale.unsqueeze(1), 0.0)
        logits.copy_(g)
    return loss, lse


def _softmax_stats_torch(logits, inv_temperature):
    z = logits.to(acc_dtype(logits.dtype)) * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(1))
    return z, lse, p, (p * z).sum(-1)


def _logprob_rows_torch(logits, targets, ignore_index, inv_temperature):
    z, lse, p, mean = _softmax_stats_torch(logits, inv_temperature)
    valid = targets != ignore_index
    z_y = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, z_y - lse, 0.0), lse - mean


def _logprob_rows_bwd_torch(logits, targets, grad_logprob, grad_entropy, ignore_index, inv_temperature):
    z, lse, p, mean = _softmax_stats_torch(logits, inv_temperature)
    valid = targets != ignore_index
    g = torch.where(valid, grad_logprob, 0.0).unsqueeze(1)
    d = -p * (g + grad_entropy.unsqueeze(1) * (z - mean.unsqueeze(1)))
    d.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), g)
    logits.copy_(d * inv_temperature)


# --------------------------------------------------------------------------- dispatch


def _new_rows(logits: Tensor) -> Tensor:
    from ._backend import new_output

    return new_output(logits.shape[0], dtype=acc_dtype(logits.dtype), device=logits.device)


def xent_rows_(backend, logits, labels, row_scale, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
    args = (logits, labels, row_scale, int(ignore_index), float(label_smoothing), float(z_loss),
            float(softcap), bool(compute_grad))
    if backend == "native":
        return torch.ops.fastllm.xent_rows_(*args)
    if backend == "triton":
        from fastllm.triton_kernels.cross_entropy import xent_rows_ as triton_xent_rows_

        return triton_xent_rows_(*args, loss=_new_rows(logits), lse=_new_rows(logits))
    return _xent_rows_torch(*args)


def logprob_rows(backend, logits, targets, ignore_index, inv_temperature):
    args = (logits, targets, int(ignore_index), float(inv_temperature))
    if backend == "native":
        return torch.ops.fastllm.logprob_rows(*args)
    if backend == "triton":
        from fastllm.triton_kernels.cross_entropy import logprob_rows as triton_logprob_rows

        return triton_logprob_rows(*args, logprob=_new_rows(logits), entropy=_new_rows(logits))
    return _logprob_rows_torch(*args)


def logprob_rows_bwd_(backend, logits, targets, grad_logprob, grad_entropy, ignore_index, inv_temperature):
    args = (logits, targets, grad_logprob, grad_entropy, int(ignore_index), float(inv_temperature))
    if backend == "native":
        torch.ops.fastllm.logprob_rows_bwd_(*args)
    elif backend == "triton":
        from fastllm.triton_kernels.cross_entropy import logprob_rows_bwd_ as triton_logprob_rows_bwd_

        triton_logprob_rows_bwd_(*args)
    else:
        _logprob_rows_bwd_torch(*args)


NATIVE_OP = "xent_rows_"  # the row kernels are the only backend-specific part of the family


def _register_native_fakes() -> None:
    from fastllm import _extension

    if not _extension.available():
        return

    @torch.library.register_fake("fastllm::xent_rows_")
    def _(logits, labels, row_scale, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
        acc = acc_dtype(logits.dtype)
        return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)

    @torch.library.register_fake("fastllm::logprob_rows")
    def _(logits, targets, ignore_index, inv_temperature):
        acc = acc_dtype(logits.dtype)
        return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)

    @torch.library.register_fake("fastllm::logprob_rows_bwd_")
    def _(logits, targets, grad_logprob, grad_entropy, ignore_index, inv_temperature):
        return None


_register_native_fakes()
