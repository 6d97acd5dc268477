"""x W^T + b for a few rows at inference: a decode step's projections and LM head.

    y = small_linear(x, weight, bias)    # F.linear's contract: x (..., K), weight (N, K), bias (N,)
    q, k, v = small_linear(x, w_qkv, split=[nq, nk, nv])   # the column blocks, each contiguous

A decode step multiplies a handful of rows (the batch) by every weight of the model once, so
its time is the read of the weights; the BLAS in the torch wheel is far from that bound at
these shapes on the CPU (bench/README.md, "small-rows linear"). On the CPU, for float32 and at
most SMALL_LINEAR_MAX_ROWS rows, with no gradient needed, this runs `fastllm::small_linear_fwd`
(csrc/cpu/small_linear.cpp). Everywhere else it is `fastllm.ops.linear`: with more rows (a
prefill over a KV cache) the tile kernel's product, which on the SmolLM2 prefill's products
(2048 rows) measured 20% faster than the wheel's BLAS in one process (bench/README.md); and
`F.linear` itself, which is the reference, where that does not apply (other devices and dtypes,
the reference backend). With `split` on the CPU kernels, each part is a product of its own
weight rows (contiguous outputs, as the native kernel gives); elsewhere the parts are views of
one product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import choose
from .linear import linear

# rows up to which the native kernel beat the wheel's BLAS on every shape of the SmolLM2 decode
# step (1 and 2 threads, bench/README.md); above it packed products win (fastllm.ops.linear)
SMALL_LINEAR_MAX_ROWS = 64


def small_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def _native_fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() == 0 or weight.dim() != 2 or weight.stride(-1) != 1 or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or not bias.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False  # the kernel has no backward
    rows = x.numel() // max(x.shape[-1], 1)
    return 0 < rows <= SMALL_LINEAR_MAX_ROWS


def small_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, split: Sequence[int] | None = None,
                 backend: str = "auto") -> Tensor | list[Tensor]:
    """F.linear(x, weight, bias), through the native small-rows kernel where it applies (see
    the module docstring); the same values up to float32 rounding of the sums' order. With
    `split` (widths summing to weight's rows) the output's column blocks, as a list: contiguous
    tensors from the kernel (a fused projection's parts without copies), views otherwise."""
    if not _native_fits(x, weight, bias) or choose(
        "small_linear", x.device, backend, native_op="small_linear_fwd", has_triton=False
    ) != "native":
        # fastllm.ops.linear: the tile kernel where it applies (a prefill's many rows), else F.linear
        if split is not None and choose("linear", x.device, backend, native_op="mm_f32_out_",
                                        has_triton=False) == "native":
            # on fastllm's CPU kernels each part is its own product, written contiguously as the
            # native kernel writes them: a prefill's q/k/v and gate/up as strided views of one
            # output would each be copied by the op that reads them next (RoPE, SwiGLU)
            parts, start = [], 0
            for n in split:
                stop = start + n
                parts.append(linear(x, weight[start:stop], None if bias is None else bias[start:stop],
                                    backend=backend))
                start = stop
            return parts
        y = linear(x, weight, bias, backend=backend)
        return y if split is None else list(y.split_with_sizes(list(split), -1))
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    lead = x.shape[:-1]
    outs = torch.ops.fastllm.small_linear_fwd(x2, weight, bias, [] if split is None else list(split))
    if split is None:
        return outs[0].view(*lead, weight.shape[0])
    return [o.view(*lead, o.shape[-1]) for o in outs]
