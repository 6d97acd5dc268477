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
from .cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy_reference
from .decode_attention import decode_attention, decode_attention_reference
from .decode_layer import decode_layer, decode_layer_reference
from .kv_append_rope import kv_append_rope, kv_append_rope_reference
from .linear import linear, linear_reference
from .linear_cross_entropy import linear_cross_entropy, mlm_loss, mlm_loss_reference, next_token_loss
from .logprobs import token_logprobs, token_logprobs_and_entropy, token_logprobs_and_entropy_reference
from .lora_linear import lora_linear, lora_linear_backward_reference, lora_linear_group, lora_linear_reference
from .rms_norm import RMSNorm, rms_norm, rms_norm_backward_reference, rms_norm_reference
from .rope import apply_rope, rope, rope_backward_reference, rope_cos_sin, rope_inv_freq, rope_reference
from .sampling import sample, sample_reference, sampling_params
from .small_linear import SMALL_LINEAR_MAX_ROWS, small_linear, small_linear_reference
from .swiglu import swiglu, swiglu_backward_reference, swiglu_reference
from .task_losses import classification_loss, regression_loss, token_classification_loss

__all__ = [
    "classification_loss",
    "regression_loss",
    "token_classification_loss",
    "BACKENDS",
    "choose",
    "attention",
    "attention_reference",
    "attention_backward_reference",
    "attention_lse_reference",
    "attention_varlen_reference",
    "linear",
    "linear_reference",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_reference",
    "lora_linear_backward_reference",
    "RMSNorm",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_backward_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "mlm_loss",
    "mlm_loss_reference",
    "next_token_loss",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_logprobs_and_entropy_reference",
    "apply_rope",
    "rope",
    "rope_reference",
    "rope_backward_reference",
    "rope_cos_sin",
    "rope_inv_freq",
    "swiglu",
    "swiglu_reference",
    "swiglu_backward_reference",
    "decode_attention",
    "decode_attention_reference",
    "decode_layer",
    "decode_layer_reference",
    "kv_append_rope",
    "kv_append_rope_reference",
    "sample",
    "sample_reference",
    "sampling_params",
    "SMALL_LINEAR_MAX_ROWS",
    "small_linear",
    "small_linear_reference",
]
