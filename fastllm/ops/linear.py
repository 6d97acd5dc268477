"""x W^T + b with F.linear's contract, on the CPU through fastllm's own kernels.

    y = linear(x, weight, bias)    # x (..., K), weight (N, K), bias (N,) or None

The models' plain projections call this (`fastllm.models._decoder.project`; a decode step over
a KV cache takes `small_linear` on fused weights instead). On the CPU in float32 with the
compiled extension ("native") it is the registered op `fastllm::linear`, whose forward (x W^T,
W given as its .t() view, which the kernel transposes in 8 x 8 register blocks as it packs it)
input gradient (dy W) and weight gradient (dy^T x, dy read transposed) are products of
`torch.ops.fastllm.mm_f32_out_` (csrc/cpu/gemm.cpp): the tile kernel where it is the CPU's
engine for large products, torch's BLAS where that is faster (MKL on an Intel CPU;
bench/README.md). Against torch's own BLAS call in one process: on an AMD Zen 4 on par for
x W^T and 6-13% faster for dy W; on an AMD Zen 5 x W^T 1.9-2.3x and dy^T x 1.3-1.9x faster
(a full step 12-18%); on an AMD Zen 3 dy^T x on par. The bias gradient is dy summed over rows.
The LoRA op's base product runs the same kernel on the same shapes (its low-rank term a second
term of the same pass), so a LoRA layer at initialisation (B = 0) gives exactly its base
layer's output.
Everywhere else, for the reference backend and inside torch.compile (whose compiler plans its
own matmuls), `F.linear` itself, which is the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import choose


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def _fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return False
    return bias is None or (bias.dtype == torch.float32 and bias.shape == (weight.shape[0],))


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@torch.library.custom_op("fastllm::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    x2 = _rows(x)
    y = x2.new_empty((x2.shape[0], weight.shape[0]))
    torch.ops.fastllm.mm_f32_out_(y, x2, weight.t(), False)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    dy = _rows(grad_out)
    dx = dw = db = None
    if need_x:
        dx = dy.new_empty((dy.shape[0], weight.shape[1]))
        torch.ops.fastllm.mm_f32_out_(dx, dy, weight.contiguous(), False)
        dx = dx.view(x.shape)
    if need_w:  # dy^T x: A is dy read transposed, K the rows
        dw = dy.new_empty(weight.shape)
        torch.ops.fastllm.mm_f32_out_(dw, dy.t(), _rows(x), False)
    if need_b and ctx.has_bias:
        db = dy.sum(0)
    return dx, dw, db


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """F.linear(x, weight, bias) (see the module docstring); the same values up to float32
    rounding of the sums' order."""
    if torch.compiler.is_compiling() or not _fits(x, weight, bias) or choose(
        "linear", x.device, backend, native_op="mm_f32_out_", has_triton=False
    ) != "native":
        return F.linear(x, weight, bias)  # under torch.compile: the compiler's own matmul
    return torch.ops.fastllm.linear(x, weight, bias)
