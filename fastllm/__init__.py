"""fastllm: fused kernels and explicit training loops for language models."""

from fastllm import (
    _extension,  # noqa: F401  (loads fastllm._C first: it defines the op schemas)
    ops,  # noqa: F401  (registers torch.ops.fastllm.*)
)

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled extension fastllm._C is loaded."""
    return _extension.available()
