"""The chunk loop shared by the logits-free ops (linear cross-entropy, token log-probs).

For hidden (N, H), weight (V, H) and bias (V,), rows are processed `chunk` at a time:

    logits = hidden[s:e] @ weight.T + bias        (chunk, V), in hidden's dtype
    row_fn(logits, s, e)                          row kernels; may overwrite logits with
                                                  g = d objective / d logits (in place)
    grad_hidden[s:e]  = g @ weight                (chunk, H)
    grad_weight      += g.T @ hidden[s:e]         (V, H)
    grad_bias        += g.sum(0)                  (V,)

so the (N, V) logits never exist: the largest temporary is one (chunk, V) block, allocated
once per call and reused by every chunk, which the default chunk size keeps about as large as
hidden itself. The three matmuls are the same
FLOPs as the unfused forward+backward. On the CPU in float32 the logits and grad_hidden
products go through `torch.ops.fastllm.mm_f32_out_` (csrc/cpu/gemm.cpp: the CPU's products
engine, the tile kernel, which transposes the head's .t() view as it packs it, or torch's BLAS
where that is faster); grad_weight stays on BLAS.

grad_weight accumulates in float32 for bfloat16/float16 off CUDA (each chunk's product is
upcast before it is added, so summing over chunks loses nothing); on CUDA it accumulates in
the weight's dtype, as one addmm per chunk (an fp32 accumulator would cost a (V, H) pass per
chunk and the bf16 GEMM speed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._backend import native_has, new_output

LOW_PRECISION = (torch.bfloat16, torch.float16)
CPU_MIN_ROWS = 256  # rows per logits block on the CPU: skinny chunks are memory-bound
# On the CPU's BLAS products engine (MKL on an Intel CPU) every product packs the whole (V, H)
# weight again, so larger chunks pay for it less often: SmolLM2's head (2048 x 576 hidden,
# V = 49152), loss and gradients, 887 ms at 256 rows against 824 at 512 and 806 at 1024
# (bench/README.md). Up to CPU_BLAS_ROWS rows there, while the logits block stays within
# CPU_BLAS_BLOCK_BYTES (201 MB at SmolLM2's vocabulary; Llama 3's 128k vocabulary gets 512 rows).
CPU_BLAS_ROWS = 1024
CPU_BLAS_BLOCK_BYTES = 256 << 20


def default_chunk_size(n_rows: int, hidden: int, vocab: int, min_rows: int = 128) -> int:
    """Rows per chunk: a power of two near N / ceil(V / H), so chunk * V ~ N * H (the
    logits block is about as large as the hidden states; Liger-Kernel's rule), but at
    least min_rows: every chunk re-reads and re-writes the whole (V, H) grad_weight, which
    small chunks turn into the bottleneck (a GPU needs more rows per byte of grad_weight
    than a CPU: 256 there, 128 on the CPU). At most N. The CPU's loop passes cpu_min_rows: 256
    (CPU_MIN_ROWS) on the tile kernel, where SmolLM2's head (V=49152, H=576) measured 3x faster
    than with 16, and up to 1024 on BLAS."""
    ratio = max(1, -(-vocab // max(hidden, 1)))
    target = max(1, -(-n_rows // ratio))
    chunk = 1 << (target - 1).bit_length()
    return max(1, min(max(chunk, min_rows), n_rows))


def cpu_min_rows(vocab: int, itemsize: int, tile: bool) -> int:
    """The least rows per chunk on the CPU: CPU_MIN_ROWS where the products run on the tile
    kernel (`tile`: fastllm's products engine is "tile"), else up to CPU_BLAS_ROWS (above)."""
    if tile and torch.ops.fastllm.cpu_products() == "tile":
        return CPU_MIN_ROWS
    rows = CPU_BLAS_ROWS
    while rows > CPU_MIN_ROWS and rows * vocab * itemsize > CPU_BLAS_BLOCK_BYTES:
        rows //= 2
    return rows


def _tile_products(backend: str, hidden: Tensor, weight: Tensor) -> bool:
    """Whether the chunk products go through the C++ products entry (`mm_f32_out_`, which runs
    the CPU's products engine: the tile kernel, or torch's BLAS where that is faster): the
    caller's op chose the native backend, and hidden and weight are float32 on the CPU."""
    return (backend == "native" and hidden.device.type == "cpu" and hidden.dtype == torch.float32
            and weight.dtype == torch.float32 and native_has("mm_f32_out_", hidden.device))


def run_chunks(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int,
    row_fn: Callable[[Tensor, int, int], None], *,
    need_hidden: bool, need_weight: bool, need_bias: bool, compute_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the loop above. Returns (grad_hidden, grad_weight, grad_bias); each is an empty
    (0,) tensor when not needed (or when compute_grad is False). `backend` is the one the
    calling op chose: "native" runs the products through the tile kernel where it applies, any
    other leaves them to torch."""
    N, H = hidden.shape
    V = weight.shape[0]
    # float32 on the CPU: logits and grad_hidden through mm_f32_out_ (csrc/cpu/gemm.cpp), on the
    # CPU's products engine
    tile = _tile_products(backend, hidden, weight)
    min_rows = 256 if hidden.is_cuda else cpu_min_rows(V, hidden.element_size(), tile)
    chunk = chunk_size if chunk_size > 0 else default_chunk_size(N, H, V, min_rows)
    need_hidden, need_weight = compute_grad and need_hidden, compute_grad and need_weight
    need_bias = compute_grad and need_bias and bias is not None
    grad_hidden = (new_output(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden
                   else hidden.new_empty(0))
    upcast_w = weight.dtype in LOW_PRECISION and hidden.device.type != "cuda"
    w_acc = torch.float32 if upcast_w else weight.dtype
    # not zeroed: the first chunk's product overwrites it (beta 0), the others add to it; a (V, H)
    # fill is a pass over the whole head (90 ms on the CPU for SmolLM2's, most of it first touches)
    grad_weight = torch.empty((V, H), dtype=w_acc, device=weight.device) if need_weight else hidden.new_empty(0)
    b_acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_bias = torch.zeros(V, dtype=b_acc, device=hidden.device) if need_bias else hidden.new_empty(0)
    weight_t = weight.t()
    # one logits block for every chunk, whichever product fills it: a (chunk, V) tensor per chunk
    # is a fresh allocation each time (on the CPU a fresh mapping: 50 MB for SmolLM2's head at 256
    # rows, 12k first-touch page faults; bench/README.md); new_output takes it from the CPU
    # ops' pool, so the next call (the next training step) finds it mapped
    block = new_output((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        h = hidden[start:end]
        logits = block[: end - start]  # (chunk, V)
        if tile:
            if bias is not None:
                logits.copy_(bias.expand_as(logits))
            torch.ops.fastllm.mm_f32_out_(logits, h, weight_t, bias is not None)
        elif bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        row_fn(logits, start, end)
        if not compute_grad:
            continue
        # logits now holds d objective / d logits for these rows
        if need_hidden:
            if tile:
                torch.ops.fastllm.mm_f32_out_(grad_hidden[start:end], logits, weight, False)
            else:
                torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_weight:
            beta = 0.0 if start == 0 else 1.0  # beta 0: grad_weight's garbage is ignored, NaN included
            if upcast_w:
                grad_weight.addmm_(logits.t().float(), h.float(), beta=beta)
            else:  # BLAS also with the tile kernel: its transposed-A product is no faster here
                grad_weight.addmm_(logits.t(), h, beta=beta)
        if need_bias:
            grad_bias += logits.sum(0, dtype=b_acc)
        del logits
    if need_weight:
        if N == 0:
            grad_weight.zero_()  # no chunk wrote it
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
