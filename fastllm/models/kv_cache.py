"""A preallocated key/value cache for incremental decoding.

k, v: (num_layers, B, max_len, Hkv, D); lengths: (B,) int64, how many positions of each
sequence are filled. A forward with the cache writes its T new keys/values of sequence b at
positions lengths[b] .. lengths[b]+T-1 (`update`, once per layer) and then the model moves
the lengths on by the number of real new tokens (`advance`, once per forward).

Sequences may have different lengths (a right-padded prefill advances each by its own
real length; the padding slots are overwritten by the next step). A step with T > 1 new
tokens needs equal lengths (causal masking aligns the last query with the last key);
single-token decode steps work with any lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value storage with per-sequence lengths (see module docstring)."""

    def __init__(self, num_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        shape = (num_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.k.device)
        self._max_length = 0  # host copy of lengths.max(): no device sync per step
        self._equal = True  # whether every sequence has the same length

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.lengths.zero_()
        self._max_length, self._equal = 0, True

    def check_append(self, num_new: int) -> None:
        """Raise unless a step of num_new tokens per sequence can be appended."""
        if self._max_length + num_new > self.max_len:
            raise ValueError(f"kv_cache: {num_new} new positions after {self._max_length} exceed "
                             f"max_len={self.max_len}")
        if num_new > 1 and not self._equal:
            raise ValueError(f"kv_cache: a step of {num_new} tokens needs equal cached lengths; with "
                             "different lengths append one token per step")

    def positions(self, num_new: int) -> Tensor:
        """Position ids of the next num_new tokens of each sequence: (B, num_new)."""
        return self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new k, v (B, T, Hkv, D) of layer `layer_idx` and return what to attend to:
        keys, values (B, S, Hkv, D) with S = max(lengths) + T, and the key padding mask (B, S),
        True for filled positions j < lengths[b] + T. The lengths move only in `advance`."""
        B, T = k.shape[0], k.shape[1]
        if tuple(k.shape) != (self.batch, T) + tuple(self.k.shape[3:]):
            raise ValueError(f"k: expected shape {[self.batch, T] + list(self.k.shape[3:])}, got {list(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {list(k.shape)} (same as k), got {list(v.shape)}")
        if self._equal:
            start = self._max_length
            self.k[layer_idx, :, start:start + T] = k.to(self.k.dtype)
            self.v[layer_idx, :, start:start + T] = v.to(self.v.dtype)
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            cols = self.positions(T)  # (B, T)
            self.k[layer_idx][rows, cols] = k.to(self.k.dtype)
            self.v[layer_idx][rows, cols] = v.to(self.v.dtype)
        S = self._max_length + T
        mask = torch.arange(S, device=k.device)[None, :] < (self.lengths[:, None] + T)  # (B, S)
        return self.k[layer_idx, :, :S], self.v[layer_idx, :, :S], mask

    def advance(self, num_new: int | Tensor) -> None:
        """Move the lengths on by num_new: an int for every sequence, or a (B,) tensor of
        real new tokens per sequence (right-padded steps)."""
        if isinstance(num_new, Tensor):
            self.lengths += num_new.to(self.lengths)
            self._max_length = int(self.lengths.max())
            self._equal = bool((self.lengths == self._max_length).all())
        else:
            self.lengths += num_new
            self._max_length += num_new
