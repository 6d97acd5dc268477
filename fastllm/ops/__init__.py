"""Fused ops, each registered once as `torch.ops.fastllm.<name>`.

Import this package to register them. Every op picks its backend per call (see
`fastllm.ops._backend`); `<op>_reference` is the plain PyTorch definition it is tested
against.
"""

from ._backend import BACKENDS, choose
from .attention import (
    attention,
    attention_backward_reference,
    attention_lse_reference,
    attention_reference,
    attention_varlen_reference,
)
from .rms_norm import RMSNorm, rms_norm, rms_norm_backward_reference, rms_norm_reference

__all__ = [
    "BACKENDS",
    "choose",
    "attention",
    "attention_reference",
    "attention_backward_reference",
    "attention_lse_reference",
    "attention_varlen_reference",
    "RMSNorm",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_backward_reference",
]
