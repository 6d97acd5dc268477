"""Loads the compiled extension `fastllm._C` once.

If it is missing (a pure-Python install) or fails to load (built against another torch),
`import fastllm` still works: it warns once and every op falls back to its PyTorch
reference. FASTLLM_DISABLE_EXTENSION=1 skips loading on purpose (tests use it).
"""

from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (fastllm._C links against libtorch: load it first)

_loaded = False
_error: str | None = None


def _load() -> None:
    global _loaded, _error
    if os.environ.get("FASTLLM_DISABLE_EXTENSION", "0") == "1":
        _error = "disabled by FASTLLM_DISABLE_EXTENSION=1"
    else:
        try:
            from fastllm import _C  # noqa: F401  (registers torch.ops.fastllm.* kernels)

            _loaded = True
        except (ImportError, OSError) as exc:
            _error = f"{type(exc).__name__}: {exc}"
    if not _loaded:
        warnings.warn(
            f"fastllm: the compiled extension fastllm._C is not available ({_error}); "
            "fused ops use their Triton kernels on CUDA where possible and the PyTorch "
            "references otherwise.",
            RuntimeWarning,
            stacklevel=3,
        )


def available() -> bool:
    """True when fastllm._C is loaded."""
    return _loaded


def load_error() -> str | None:
    """Why fastllm._C is not loaded, or None when it is."""
    return _error


_load()
