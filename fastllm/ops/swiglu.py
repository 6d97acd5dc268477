"""SwiGLU gate (Shazeer, 2020, "GLU Variants Improve Transformer"): y = silu(gate) * up.

silu(g) = g * sigmoid(g). With s = sigmoid(g) and dy the output gradient:

    d gate = dy * up * s * (1 + g * (1 - s))
    d up   = dy * g * s

gate, up: same shape (..., I), float32, float64, bfloat16 or float16; computed in float32
(float64 for float64) and rounded once. The backward recomputes s from gate, so only
gate and up are kept for it (the same two tensors the unfused MLP keeps).

Layers, top to bottom: references -> checks -> registered op `torch.ops.fastllm.swiglu`
(backend choice, fake, autograd) -> functional `swiglu()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_tensor

# --------------------------------------------------------------------------- references


def swiglu_reference(gate: Tensor, up: Tensor, upcast: bool = True) -> Tensor:
    """Plain PyTorch silu(gate) * up; upcast=False runs in the inputs' own dtype."""
    dtype = gate.dtype
    if upcast and dtype != torch.float64:
        gate, up = gate.float(), up.float()
    return (F.silu(gate) * up).to(dtype)


def swiglu_backward_reference(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form gradients (module docstring), in float32 (float64 for float64)."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    dy, g, u = grad_out.to(acc), gate.to(acc), up.to(acc)
    s = torch.sigmoid(g)
    d_gate = dy * u * s * (1 + g * (1 - s))
    d_up = dy * g * s
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


# --------------------------------------------------------------------------- checks


def _check(gate: Tensor, up: Tensor) -> None:
    check_tensor(gate, "gate")
    check_tensor(up, "up")
    check_dtype(gate, "gate")
    check_dtype(up, "up")
    check_same_device(gate, "gate", up, "up")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected shape {list(gate.shape)} (same as gate), got {list(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected dtype {gate.dtype} (same as gate), got {up.dtype}")


def _choose(x: Tensor, backend: str) -> str:
    return _backend.choose("swiglu", x.device, backend, native_op="swiglu_fwd")


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, backend: str = "auto") -> Tensor:
    _check(gate, up)
    chosen = _choose(gate, backend)
    if chosen == "reference":
        return swiglu_reference(gate, up)
    g, u = gate.contiguous(), up.contiguous()
    if chosen == "native":
        return torch.ops.fastllm.swiglu_fwd(g, u)
    from fastllm.triton_kernels.swiglu import swiglu_fwd

    out = _backend.new_output(g.shape, dtype=g.dtype, device=g.device)
    return swiglu_fwd(g, u, out)


@_swiglu_op.register_fake
def _(gate, up, backend="auto"):
    _check(gate, up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastllm::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    chosen = _choose(gate, backend)
    if chosen == "reference":
        return swiglu_backward_reference(grad_out, gate, up)
    dy, g, u = grad_out.to(gate.dtype).contiguous(), gate.contiguous(), up.contiguous()
    if chosen == "native":
        return tuple(torch.ops.fastllm.swiglu_bwd(dy, g, u))
    from fastllm.triton_kernels.swiglu import swiglu_bwd

    d_gate = _backend.new_output(g.shape, dtype=g.dtype, device=g.device)
    d_up = _backend.new_output(g.shape, dtype=g.dtype, device=g.device)
    swiglu_bwd(dy, g, u, d_gate, d_up)
    return d_gate, d_up


@_swiglu_backward_op.register_fake
def _(grad_out, gate, up, backend="auto"):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.fastllm.swiglu_backward(grad_out, gate, up, ctx.backend)
    return d_gate, d_up, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    from fastllm import _extension

    if not _extension.available():
        return

    @torch.library.register_fake("fastllm::swiglu_fwd")
    def _(gate, up):
        return torch.empty_like(gate)

    @torch.library.register_fake("fastllm::swiglu_bwd")
    def _(grad_out, gate, up):
        return torch.empty_like(gate), torch.empty_like(up)


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up for gate, up (..., I) -> (..., I) in their dtype.

    backend: None (auto, or FASTLLM_BACKEND), "reference", "triton" or "native"."""
    return torch.ops.fastllm.swiglu(gate, up, backend or "auto")
