"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(device: torch.device, per_sm: int = 4) -> int:
    """A persistent grid size: a few programs per SM (4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm


def acc_dtype(dtype: torch.dtype):
    """Accumulation type for a kernel: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_warps(block: int) -> int:
    """num_warps for a kernel that keeps one row of `block` elements in registers."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


MAX_FUSED_ROW = 65536  # elements; a longer row would not fit in one program's registers


def row_block(n_cols: int, name: str = "hidden size") -> int:
    block = triton.next_power_of_2(max(n_cols, 1))
    if block > MAX_FUSED_ROW:
        raise ValueError(f"{name}: at most {MAX_FUSED_ROW} elements per row, got {n_cols}")
    return block


# ------------------------------------------------------------------ ahead-of-time compilation

# Every launcher also lists the compiled variants it can choose on a GPU (`launch_configs()`),
# built from the same config function the launcher calls; tests/triton_kernels compiles each
# one for sm_80 and sm_90 without a GPU and checks its shared memory against the card's limit.
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # matmul kernels (no float64 on GPU)
ROW_DTYPES = GPU_DTYPES + (torch.float64,)  # row-wise and elementwise kernels


class LaunchSpec(NamedTuple):
    """One variant of a kernel as its launcher launches it on a GPU."""

    kernel: Any  # the @triton.jit function
    pointers: dict  # pointer argument -> element dtype (torch.dtype)
    constexprs: dict  # every tl.constexpr argument, plus integer arguments a launch always passes as 1
    num_warps: int = 4
    num_stages: int = 3  # Triton's default for CUDA
    floats: tuple = ()  # float scalar arguments; every other runtime argument is an integer


def pow2_blocks(max_block: int, warps) -> list[int]:
    """The smallest and the largest power-of-two block of every num_warps bucket up to
    max_block: the block sizes that stand for all the others a launcher can round a size to
    (within a bucket only the tile length changes, not the warps or the code)."""
    ends: dict[int, list[int]] = {}
    block = 1
    while block <= max_block:
        ends.setdefault(warps(block), []).append(block)
        block *= 2
    return sorted({b for blocks in ends.values() for b in (blocks[0], blocks[-1])})
