"""Per-token log-probs and entropy from hidden states, without the logits (PPO, DPO, GRPO).

hidden (..., H), weight (V, H), targets (...) int, bias (V,) or None, temperature T > 0:

    z        = (hidden @ weight.T + bias) / T              never materialised in full
    logprob  = z_target - logsumexp(z)                     (...)  (0 where target == ignore_index)
    entropy  = logsumexp(z) - sum_j softmax(z)_j z_j       (...)

Both are float32 (float64 for float64 inputs) and differentiable with respect to hidden,
weight and bias. The forward keeps nothing but its inputs; the backward recomputes each
chunk of logits and writes
    d/dz_j = g ([j == target] - p_j) - h p_j (z_j - E[z])     (g, h: incoming gradients)
over it in place, then into grad_hidden / grad_weight / grad_bias (see _chunked.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _xent_rows
from ._backend import new_output
from ._chunked import run_chunks
from .cross_entropy import check_labels
from .linear_cross_entropy import check_linear

# --------------------------------------------------------------------------- reference


def token_logprobs_and_entropy_reference(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
    bias: Tensor | None = None, ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """From the full logits in float32 (float64 for float64), differentiable by autograd."""
    acc = _xent_rows.acc_dtype(hidden.dtype)
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    logp = torch.log_softmax(z / temperature, dim=-1)  # (..., V)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(valid, picked, torch.zeros_like(picked))
    entropy = -(logp.exp() * logp).sum(-1)
    return logprob, entropy


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::token_logprobs_and_entropy", mutates_args=())
def _logprobs_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
    inv_temperature: float, chunk_size: int, backend: str,
) -> tuple[Tensor, Tensor]:
    chosen = _backend.choose("token_logprobs_and_entropy", hidden.device, backend, native_op=_xent_rows.NATIVE_OP)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    acc = _xent_rows.acc_dtype(hidden.dtype)
    logprob = new_output(hidden.shape[0], dtype=acc, device=hidden.device)
    entropy = new_output(hidden.shape[0], dtype=acc, device=hidden.device)

    def row_fn(logits, start, end):
        lp, ent = _xent_rows.logprob_rows(chosen, logits, targets[start:end], ignore_index, inv_temperature)
        logprob[start:end], entropy[start:end] = lp, ent

    run_chunks(hidden, weight, bias, chunk_size, row_fn, need_hidden=False, need_weight=False,
               need_bias=False, compute_grad=False, backend=chosen)
    return logprob, entropy


@_logprobs_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, inv_temperature, chunk_size, backend):
    acc = _xent_rows.acc_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@torch.library.custom_op("fastllm::token_logprobs_and_entropy_backward", mutates_args=())
def _logprobs_backward_op(
    grad_logprob: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
    bias: Tensor | None, ignore_index: int, inv_temperature: float, chunk_size: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    chosen = _backend.choose("token_logprobs_and_entropy", hidden.device, backend, native_op=_xent_rows.NATIVE_OP)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    acc = _xent_rows.acc_dtype(hidden.dtype)
    g, h = grad_logprob.to(acc).contiguous(), grad_entropy.to(acc).contiguous()

    def row_fn(logits, start, end):
        _xent_rows.logprob_rows_bwd_(chosen, logits, targets[start:end], g[start:end], h[start:end],
                                     ignore_index, inv_temperature)

    return run_chunks(hidden, weight, bias, chunk_size, row_fn, need_hidden=need_hidden,
                      need_weight=need_weight, need_bias=need_bias, compute_grad=True, backend=chosen)


@_logprobs_backward_op.register_fake
def _(grad_logprob, grad_entropy, hidden, weight, targets, bias, ignore_index, inv_temperature,
      chunk_size, need_hidden, need_weight, need_bias, backend):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, *options = inputs
    ctx.save_for_backward(hidden, weight, targets, bias)
    ctx.options = options


def _backward(ctx, grad_logprob, grad_entropy):
    hidden, weight, targets, bias = ctx.saved_tensors
    ignore_index, inv_temperature, chunk_size, backend = ctx.options
    if grad_logprob is None:
        grad_logprob = hidden.new_zeros(hidden.shape[0], dtype=_xent_rows.acc_dtype(hidden.dtype))
    if grad_entropy is None:
        grad_entropy = hidden.new_zeros(hidden.shape[0], dtype=_xent_rows.acc_dtype(hidden.dtype))
    need = ctx.needs_input_grad
    need_bias = bias is not None and need[3]
    gh, gw, gb = torch.ops.fastllm.token_logprobs_and_entropy_backward(
        grad_logprob, grad_entropy, hidden, weight, targets, bias, ignore_index, inv_temperature,
        chunk_size, need[0], need[1], need_bias, backend)
    return (gh if need[0] else None, gw if need[1] else None, None, gb if need_bias else None,
            None, None, None, None)


_logprobs_op.register_autograd(_backward, setup_context=_setup_context)

# --------------------------------------------------------------------------- public API


def token_logprobs_and_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
    bias: Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(target) and the entropy at every position, from hidden states.

    hidden: (..., H); weight: (V, H); targets: (...) ints in [0, V) or ignore_index (their
    log-prob is 0). Returns (logprobs, entropy), each shaped like targets, float32 (float64
    for float64 inputs), differentiable with respect to hidden, weight and bias.
    """
    check_linear(hidden, weight, bias)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive value, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size: expected None or a positive integer, got {chunk_size}")
    H = hidden.shape[-1]
    flat = check_labels(targets, "targets", hidden.shape[:-1], weight.shape[0], ignore_index)
    logprob, entropy = torch.ops.fastllm.token_logprobs_and_entropy(
        hidden.reshape(-1, H), weight, flat, bias, int(ignore_index), 1.0 / float(temperature),
        int(chunk_size or 0), backend or "auto")
    return logprob.view(targets.shape), entropy.view(targets.shape)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, **kwargs) -> Tensor:
    """Only the log-probs of token_logprobs_and_entropy (the entropy costs one extra
    multiply-add per logit, nothing more)."""
    return token_logprobs_and_entropy(hidden, weight, targets, **kwargs)[0]
