"""RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2, -1) + eps) * weight.

x: (..., H) in float32, float64, bfloat16 or float16; weight: (H,). Computed in float32
(float64 for float64 input) and rounded once to x's dtype.

Layers, top to bottom: reference -> checks -> registered op `torch.ops.fastllm.rms_norm`
(backend choice, fake implementation, autograd) -> functional `rms_norm()` -> `RMSNorm`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _backend
from ._checks import check_dtype, check_positive, check_same_device, check_shape, check_tensor

# --------------------------------------------------------------------------- references


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6, upcast: bool = True) -> Tensor:
    """Plain PyTorch RMSNorm; with upcast=False it runs in x's own dtype (the low-precision
    baseline of the test rule)."""
    dtype = x.dtype
    if upcast and dtype != torch.float64:
        x, weight = x.float(), weight.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return y.to(dtype)


def rms_norm_backward_reference(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Closed-form gradients, in float32 (float64 for float64):
    dx = r * (dy*w - xhat * mean(dy*w*xhat)), dw = sum(dy * xhat) over every leading dim."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy, xf, w = grad_out.to(acc), x.to(acc), weight.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    gw = dy * w
    dx = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# --------------------------------------------------------------------------- checks


def _check(x: Tensor, weight: Tensor, eps: float) -> None:
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_dtype(x, "x")
    check_dtype(weight, "weight")
    check_same_device(x, "x", weight, "weight")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {list(x.shape)}")
    check_shape(weight, "weight", (x.shape[-1],), "the last dimension of x")
    check_positive(eps, "eps")


def _choose(x: Tensor, backend: str) -> str:
    return _backend.choose("rms_norm", x.device, backend, native_op="rms_norm_fwd")


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("fastllm::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    _check(x, weight, eps)
    chosen = _choose(x, backend)
    if chosen == "reference":
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, H)
    if chosen == "native":
        y = torch.ops.fastllm.rms_norm_fwd(x2, weight, eps)
    else:
        from fastllm.triton_kernels.rms_norm import rms_norm_fwd

        out = _backend.new_output(x2.shape, dtype=x.dtype, device=x.device)
        y = rms_norm_fwd(x2, weight.contiguous(), eps, out)
    return y.view(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps=1e-6, backend="auto"):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastllm::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, eps: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    chosen = _choose(x, backend)
    if chosen == "reference":
        return rms_norm_backward_reference(grad_out, x, weight, eps)
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()  # (rows, H)
    dy2 = grad_out.to(x.dtype).reshape(-1, H).contiguous()
    if chosen == "native":
        dx, dw = torch.ops.fastllm.rms_norm_bwd(dy2, x2, weight, eps)
    else:
        from fastllm.triton_kernels.rms_norm import rms_norm_bwd

        dx = _backend.new_output(x2.shape, dtype=x.dtype, device=x.device)
        dw = rms_norm_bwd(dy2, x2, weight.contiguous(), eps, dx).to(weight.dtype)
    return dx.view(x.shape), dw


@_rms_norm_backward_op.register_fake
def _(grad_out, x, weight, eps, backend="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.fastllm.rms_norm_backward(grad_out, x, weight, ctx.eps, ctx.backend)
    return dx, dw, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """Fake implementations of the C++ kernels, so opcheck and torch.compile can trace them."""
    from fastllm import _extension

    if not _extension.available():
        return

    @torch.library.register_fake("fastllm::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("fastllm::rms_norm_bwd")
    def _(grad_out, x, weight, eps):
        return torch.empty_like(x), torch.empty_like(weight)


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension. x: (..., H), weight: (H,) -> (..., H) in x's dtype.

    backend: None (auto, or FASTLLM_BACKEND), "reference", "triton" or "native".
    """
    return torch.ops.fastllm.rms_norm(x, weight, float(eps), backend or "auto")


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale initialised to ones."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size: expected a positive integer, got {hidden_size}")
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
