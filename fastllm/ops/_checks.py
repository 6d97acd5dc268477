"""Argument checks for the Python entry points. Messages name the argument, the expected
and the actual value, like the C++ TORCH_CHECKs in csrc/include/fastllm/checks.h."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_dtype(t: torch.Tensor, name: str, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype in {{{names}}}, got {str(t.dtype).replace('torch.', '')}")


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{b_name}: expected device {a.device} (same as {a_name}), got {b.device}")


def check_shape(t: torch.Tensor, name: str, expected: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        suffix = f" ({why})" if why else ""
        raise ValueError(f"{name}: expected shape {list(expected)}{suffix}, got {list(t.shape)}")


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name}: expected a positive value, got {value}")
