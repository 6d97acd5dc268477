"""Model definitions, configs with named presets, and Hugging Face checkpoint load/save.

    cfg = preset("tiny-llama")                 # or LlamaConfig(...), GPT2Config, BertConfig
    model = build_model(cfg)                   # LlamaForCausalLM, GPT2LMHeadModel, ...
    model = from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    save_pretrained(model, "out_dir")

Model types live in one registry (`registry.MODEL_TYPES`: model_type -> config and model
class); build_model, from_pretrained, save_pretrained and config_from_hf_dict go through it.

Causal decoders: hidden = model(input_ids, ...) (after the final norm), model.logits(hidden),
model.lm_head_weight, model.loss(input_ids, labels, ...), model.new_kv_cache(batch, max_len),
model.decode(tokens, positions, kv_cache) (the decode step, through the same forward).
BERT: hidden = model(input_ids, token_type_ids, attention_mask), model.mlm_head(hidden),
model.mlm_loss(input_ids, labels).
Task heads (heads.py: reward models, classification, regression, token tags):
model = build_head_model(cfg, "sequence_classification", TaskHead(num_labels=...)),
model.scores(...), model.loss(input_ids, labels), model.predict(...).
"""

from . import registry
from .bert import BertForMaskedLM
from .checkpoint import from_pretrained, save_pretrained
from .config import PRESETS, BertConfig, GPT2Config, LlamaConfig, preset
from .gpt2 import GPT2LMHeadModel
from .heads import (
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
    TaskHead,
    build_head_model,
)
from .kv_cache import KVCache
from .llama import LlamaForCausalLM
from .registry import config_from_hf_dict, register


def build_model(config):
    """A randomly initialised model for a config dataclass (class from the registry)."""
    return registry.model_class(config)(config)


__all__ = [
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "GPT2ForSequenceClassification",
    "LlamaForSequenceClassification",
    "TaskHead",
    "build_head_model",
    "BertConfig",
    "BertForMaskedLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "PRESETS",
    "build_model",
    "config_from_hf_dict",
    "from_pretrained",
    "preset",
    "register",
    "registry",
    "save_pretrained",
]
