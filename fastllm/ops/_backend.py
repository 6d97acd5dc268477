"""Backend choice for the fused ops, and output allocation shared by their launchers.

Every fused op has three implementations:
  reference : plain PyTorch, obviously correct, runs anywhere;
  triton    : Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1);
  native    : C++ (csrc/cpu) and CUDA (csrc/cuda) kernels in fastllm._C.

"auto" picks native on the CPU and the op's preferred compiled backend on CUDA, falling
back to the reference. FASTLLM_BACKEND=reference|triton|native forces one for every call;
an op's `backend=` argument forces one for that call and wins over the variable.
`choose` is the one chooser of every op; it resolves each (op, device, backend) once and
caches the answer (`clear_cache()` after changing the variable).
"""

from __future__ import annotations

import functools
import os

import torch

from fastllm import _extension

BACKENDS = ("reference", "triton", "native")
CHOICES = ("auto",) + BACKENDS


@functools.cache
def triton_error() -> str | None:
    """Why Triton cannot be used in this process, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_has(op: str, device: torch.device) -> bool:
    """Whether fastllm._C registered a kernel for `fastllm::<op>` on this device."""
    if not _extension.available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastllm::{op}", key)
    except RuntimeError:
        return False


def _why_unavailable(backend: str, native_op: str | None, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton":
        if triton_error() is not None:
            return triton_error()
        if device.type == "cpu" and not triton_interpreting():
            return "Triton runs on the CPU only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not support device type {device.type!r}"
        return None
    if native_op is None:
        return "this op has no native kernel"
    if not _extension.available():
        return f"the compiled extension is not loaded ({_extension.load_error()})"
    if not native_has(native_op, device):
        return f"fastllm._C has no {device.type} kernel for fastllm::{native_op}"
    return None


_CACHE: dict[tuple, str] = {}


def clear_cache() -> None:
    """Forget every resolved choice (after changing FASTLLM_BACKEND or loading the extension)."""
    _CACHE.clear()


def env_backend() -> str:
    """FASTLLM_BACKEND, validated ("auto" when unset or empty); cached like every choice."""
    key = ("FASTLLM_BACKEND",)
    if key not in _CACHE:
        value = os.environ.get("FASTLLM_BACKEND", "auto") or "auto"
        if value not in CHOICES:
            raise ValueError(f"FASTLLM_BACKEND: expected one of {CHOICES}, got {value!r}")
        _CACHE[key] = value
    return _CACHE[key]


def choose(
    op: str,
    device: torch.device,
    backend: str = "auto",
    *,
    native_op: str | None = None,
    cuda_order: tuple[str, ...] = ("triton", "native"),
    has_triton: bool = True,
) -> str:
    """Resolve `backend` ("auto" or one of BACKENDS) for `op` on `device`: the one chooser of
    every fused op. Resolved once per (op, device, backend, ...) and cached, so a call costs a
    dictionary look-up; `clear_cache()` makes the next call read FASTLLM_BACKEND again.

    native_op: the name of the op's C++ forward (to look up its registered kernels).
    cuda_order: which compiled backend "auto" prefers on CUDA (decided by benchmark).
    has_triton: False for ops without a Triton kernel (the inference ops): FASTLLM_BACKEND=triton
        then falls back to auto for them, and an explicit backend="triton" is an error.
    """
    key = (op, device, backend, native_op, cuda_order, has_triton)
    chosen = _CACHE.get(key)
    if chosen is None:
        chosen = _CACHE[key] = _resolve(op, device, backend, native_op, cuda_order, has_triton)
    return chosen


def _resolve(op, device, backend, native_op, cuda_order, has_triton) -> str:
    if backend not in CHOICES:
        raise ValueError(f"backend: expected one of {CHOICES}, got {backend!r}")
    if not has_triton:
        if backend == "triton":
            raise RuntimeError(f"{op}: backend 'triton' is unavailable: this op has no Triton kernel "
                               "(use 'reference' or 'native')")
        cuda_order = tuple(b for b in cuda_order if b != "triton")
    if backend == "auto":
        backend = env_backend()
        if backend == "triton" and not has_triton:
            backend = "auto"
    if backend != "auto":
        why = _why_unavailable(backend, native_op, device)
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable on {device}: {why}")
        return backend
    order = cuda_order if device.type == "cuda" else ("native",)
    for candidate in order:
        if _why_unavailable(candidate, native_op, device) is None:
            return candidate
    return "reference"


def poisoning() -> bool:
    """FASTLLM_POISON=1: fill new outputs with NaN so unwritten elements show up in tests."""
    return os.environ.get("FASTLLM_POISON", "0") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor under FASTLLM_POISON=1. On the CPU with fastllm._C,
    from the C++ ops' output pool (`torch.ops.fastllm.pooled_empty`; tensors of 1 MiB and up:
    csrc/include/fastllm/cpu_mm.h), so that an output or scratch block made at every training
    step finds the pages of the step before mapped (the chunked head's 201 MB logits block was
    49k page faults a SmolLM2 LoRA step; bench/README.md)."""
    if torch.device(device).type == "cpu" and _extension.available():
        out = torch.ops.fastllm.pooled_empty([shape] if isinstance(shape, int) else list(shape), dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
