"""A preallocated key/value cache for incremental decoding.

k, v: (num_layers, B, max_len, Hkv, D); lengths: (B,) int64, how many positions of each
sequence are filled. A forward with the cache writes its T new keys/values of sequence b at
positions lengths[b] .. lengths[b]+T-1 (`update`, once per layer) and then the model moves
the lengths on by the number of real new tokens (`advance`, once per forward).

Sequences may have different lengths (a right-padded prefill advances each by its own
real length; the padding slots are overwritten by the next step). A step with T > 1 new
tokens needs equal lengths (causal masking aligns the last query with the last key);
single-token decode steps work with any lengths.

A cache also serves the model's decode branch (`model.decode(tokens, positions, cache)`, one
token per sequence at its own position, no host sync): it holds the inference kernels that
branch calls, resolved once for its device (`kernels`), and the weights of an inference
forward's projections (`fused_projection`: q/k/v and gate/up concatenated, or kept as parts
where one row goes to BLAS, LoRA adapters merged or stacked), which live as long as the cache,
so a training step never carries them.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from fastllm.ops import _backend
from fastllm.ops.decode_attention import decode_attention_reference
from fastllm.ops.kv_append_rope import kv_append_rope_reference
from fastllm.ops.sampling import sample_reference
from fastllm.ops.small_linear import SMALL_LINEAR_MAX_ROWS

# inference op -> (its C++/CUDA forward in torch.ops.fastllm, its reference)
_INFERENCE_OPS = {
    "decode_attention": ("decode_attention_fwd", decode_attention_reference),
    "kv_append_rope": ("kv_append_rope_fwd", kv_append_rope_reference),
    "sample": ("sample_tokens", sample_reference),
}


def inference_kernel(op: str, device: torch.device, backend: str = "auto"):
    """The callable for an inference-only op (no autograd) on `device`: its native forward
    (torch.ops.fastllm.<fwd>, called directly: the registered op's argument checks and backend
    choice cost more than the kernel at decode sizes) or its reference."""
    native, reference = _INFERENCE_OPS[op]
    if _backend.choose(op, device, backend, native_op=native, cuda_order=("native",), has_triton=False) == "native":
        return getattr(torch.ops.fastllm, native)
    return reference


class DecodeKernels:
    """The kernels of the decode branch, resolved once for a device and backend.

    With the native backend the branch also calls the C++/CUDA RMSNorm and SwiGLU forwards
    directly (rms_norm, swiglu; None otherwise), skipping their autograd-aware wrappers: a
    decode step needs no gradients, and on the CPU the wrappers cost more than the kernels.
    Likewise `small_linear`, the CPU small-rows product (fastllm.ops.small_linear's kernel),
    when a step's `rows` (the cache batch) are few enough for it, and `decode_layer`, a
    Llama-family block's whole decode step in one call (fastllm.ops.decode_layer's CPU kernel,
    made of those same kernels); None otherwise."""

    def __init__(self, device: torch.device, backend: str = "auto", rows: int = 1):
        self.attention = inference_kernel("decode_attention", device, backend)
        self.append_rope = inference_kernel("kv_append_rope", device, backend)
        native = backend != "reference" and self.attention is not decode_attention_reference
        ops = torch.ops.fastllm
        self.rms_norm = ops.rms_norm_fwd if native and _backend.native_has("rms_norm_fwd", device) else None
        self.swiglu = ops.swiglu_fwd if native and _backend.native_has("swiglu_fwd", device) else None
        self.small_linear = (ops.small_linear_fwd if native and 0 < rows <= SMALL_LINEAR_MAX_ROWS
                             and _backend.native_has("small_linear_fwd", device) else None)
        self.decode_layer = (ops.decode_layer_fwd if self.small_linear is not None and self.rms_norm is not None
                             and self.swiglu is not None and _backend.native_has("decode_layer_fwd", device)
                             else None)
        # Where small_linear hands a step's products to BLAS (one row, MKL on an Intel CPU), BLAS's
        # matrix-vector product costs about as much for q, k and v as three products as for one
        # over their concatenation (+0.14 ms a SmolLM2 step), while concatenating a group's
        # weights costs every generate call ~60 ms of copies into fresh pages (bench/README.md), so
        # the groups are kept as parts (KVCache.fused_projection).
        self.parts = self.small_linear is not None and ops.small_linear_on_blas(rows)


class KVCache:
    """Per-layer key/value storage with per-sequence lengths (see module docstring)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        lora: str = "merge",
    ):
        if lora not in ("merge", "low_rank"):
            raise ValueError(f"lora: expected 'merge' or 'low_rank', got {lora!r}")
        for name, value in (
            ("num_layers", num_layers),
            ("batch", batch),
            ("max_len", max_len),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        shape = (num_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)  # per layer (B, max_len, Hkv, D) views
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.k.device)
        self._max_length: int | None = 0  # host copy of lengths.max() (None: unknown)
        self._equal = True  # whether every sequence has the same length
        self.rows = torch.arange(batch, device=self.k.device)  # (B,) row index of each sequence
        self.kernels = DecodeKernels(self.k.device, backend, batch)
        self.lora = lora  # how an inference forward runs LoRA-adapted projections (fused_projection)
        # (id(owner), names) -> (owner, modules, tensors, version sum, adapter states, fused)
        self._fused: dict[tuple, tuple] = {}
        # Set by generate for its own cache: the model is not changed while this cache decodes
        # (as a captured CUDA graph of the step also assumes), so the decode branch builds its
        # blocks' one-call arguments once (`plan`: (blocks, arguments), models._decoder.decode_plan)
        # instead of checking them at every step.
        self.fixed_model = False
        self.plan: tuple | None = None

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

    def _host_lengths(self) -> None:
        """Recompute the host copies after set_lengths (one device sync)."""
        if self._max_length is None:
            self._max_length = int(self.lengths.max())
            self._equal = bool((self.lengths == self._max_length).all())

    def check_append(self, num_new: int) -> None:
        """Raise unless a step of num_new tokens per sequence can be appended."""
        self._host_lengths()
        if self._max_length + num_new > self.max_len:
            raise ValueError(
                f"kv_cache: {num_new} new positions after {self._max_length} exceed "
                f"max_len={self.max_len}"
            )
        if num_new > 1 and not self._equal:
            raise ValueError(
                f"kv_cache: a step of {num_new} tokens needs equal cached lengths; with "
                "different lengths append one token per step"
            )

    def positions(self, num_new: int) -> Tensor:
        """Position ids of the next num_new tokens of each sequence: (B, num_new)."""
        return self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new k, v (B, T, Hkv, D) of layer `layer_idx` and return what to attend to:
        keys, values (B, S, Hkv, D) with S = max(lengths) + T, and the key padding mask (B, S),
        True for filled positions j < lengths[b] + T. The lengths move only in `advance`."""
        B, T = k.shape[0], k.shape[1]
        self._host_lengths()
        if tuple(k.shape) != (self.batch, T) + tuple(self.k.shape[3:]):
            raise ValueError(
                f"k: expected shape {[self.batch, T] + list(self.k.shape[3:])}, got {list(k.shape)}"
            )
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {list(k.shape)} (same as k), got {list(v.shape)}")
        if self._equal:
            start = self._max_length
            self.k[layer_idx, :, start : start + T] = k.to(self.k.dtype)
            self.v[layer_idx, :, start : start + T] = v.to(self.v.dtype)
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
        self._host_lengths()
        if isinstance(num_new, Tensor):
            self.lengths += num_new.to(self.lengths)
            self._max_length = int(self.lengths.max())
            self._equal = bool((self.lengths == self._max_length).all())
        else:
            self.lengths += num_new
            self._max_length += num_new

    def set_lengths(self, lengths: Tensor) -> None:
        """lengths (B,) on the device: after a decode step, position + 1 per sequence. No host
        sync: the host copies are recomputed when a forward next appends."""
        self.lengths.copy_(lengths)
        self._max_length = None

    def fused_projection(
        self, owner: nn.Module, names: tuple[str, ...]
    ) -> tuple[Tensor | tuple[Tensor, ...], Tensor | None, tuple[Tensor, Tensor] | None, list[int]] | None:
        """The projections owner.<name> (names; several when they read the same input) as
        one inference matmul: (weight (sum of out, in), bias or None, low_rank, split sizes),
        or None when a projection is neither a plain nn.Linear nor a module with
        `inference_parts()` (LoRALinear) that can give one now. Where the cache's kernels keep
        groups as parts (`kernels.parts`: one row on the BLAS engine) and no low-rank term is
        added, weight is the tuple of the projections' weights (out_i, in) instead, no copy.

        LoRA adapters (see `lora`): "merge" folds s B A into the weight (a copy of each adapted
        projection, one matmul per group); "low_rank" keeps the base weight and returns
        low_rank = (A (R, in), B (sum of out, R)), the adapters' A stacked and their s B placed
        block-diagonally, so y = x W^T + b + (x A^T) B^T: two small matmuls more, no weight copy.
        A single plain projection is returned as itself (no copy). Built on first use for this
        cache and rebuilt when a projection module is replaced, an adapter is switched, merged
        or disabled, or a source tensor changed in place (its version counter: an optimizer
        step or a copy_ under no_grad; writes through `.data` are not counted)."""
        key = (id(owner), names)
        found = owner._modules
        modules = tuple([found[n] for n in names])
        entry = self._fused.get(key)
        # version counters only grow, so their sum changes exactly when one of them does
        if (entry is not None and entry[0] is owner and entry[1] == modules
                and sum([t._version for t in entry[2]]) == entry[3]
                and (entry[4] is None or entry[4] == _states(modules))):
            return entry[5]
        fused, tensors, states = _fuse(modules, self.lora, self.kernels.parts), [], None
        if fused is not None:
            tensors = [t for m in modules for t in m.parameters()]
            states = _states(modules) if any(type(m) is not nn.Linear for m in modules) else None
        self._fused[key] = (owner, modules, tensors, sum([t._version for t in tensors]), states, fused)
        return fused


def _states(modules) -> tuple:
    """What, besides tensor contents, decides a wrapped projection's inference weight."""
    return tuple([m.inference_state() for m in modules if type(m) is not nn.Linear])


def _parts(module: nn.Module):
    """(weight, bias, (A, s B) or None) of a projection in an inference forward, or None."""
    if type(module) is nn.Linear:
        return module.weight, module.bias, None
    parts = getattr(module, "inference_parts", None)
    return parts() if parts is not None else None


@torch.no_grad()
def _fuse(modules, lora: str, keep_parts: bool = False):
    parts = [_parts(m) for m in modules]
    if any(p is None for p in parts):
        return None
    sizes = [w.shape[0] for w, _, _ in parts]
    weights = []
    for w, _, low in parts:
        if low is not None and lora == "merge":
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w = (w.to(acc) + low[1].to(acc) @ low[0].to(acc)).to(w.dtype)
        weights.append(w.detach())
    lows = [(i, low) for i, (_, _, low) in enumerate(parts) if low is not None]
    low_rank_term = bool(lows) and lora == "low_rank"
    if len(weights) == 1:
        weight = weights[0]
    elif keep_parts and not low_rank_term:
        weight = tuple(weights)
    else:
        weight = torch.cat(weights)
    bias = None
    if any(b is not None for _, b, _ in parts):
        bias = torch.cat([b.detach() if b is not None else weights[0].new_zeros(n)
                          for (_, b, _), n in zip(parts, sizes)])
    low_rank = None
    if low_rank_term:
        a = torch.cat([low[0].detach().to(weight.dtype) for _, low in lows])  # (R, in)
        b = weight.new_zeros(sum(sizes), a.shape[0])  # (sum of out, R), block-diagonal
        row, col = [0] + list(itertools.accumulate(sizes)), 0
        for i, low in lows:
            r = low[0].shape[0]
            b[row[i]:row[i + 1], col:col + r] = low[1].detach()
            col += r
        low_rank = (a, b)
    return weight, bias, low_rank, sizes
