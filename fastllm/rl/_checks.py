"""Argument checks shared by the RL math (shapes and masks; no host syncs)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a (B, T) tensor, got shape {tuple(x.shape)}")


def as_mask(mask: Tensor, like: Tensor, like_name: str) -> Tensor:
    """The (B, T) bool/0-1 mask as `like`'s float dtype, after checking its shape."""
    check_same_shape("mask", mask, like_name, like)
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or real tensor, got {mask.dtype}")
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    return mask.to(dtype)


def check_group_size(rewards: Tensor, group_size: int, minimum: int) -> int:
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a (B,) tensor, got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < minimum:
        raise ValueError(f"group_size: expected an integer >= {minimum}, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards: expected a length divisible by group_size={group_size}, got {rewards.shape[0]}"
        )
    return rewards.shape[0] // group_size
