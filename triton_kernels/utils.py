"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import os

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
