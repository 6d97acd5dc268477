"""Model definitions, configs with named presets, and Hugging Face checkpoint load/save.

    cfg = preset("tiny-llama")                 # or LlamaConfig(...), GPT2Config, BertConfig
    model = build_model(cfg)                   # LlamaForCausalLM / GPT2LMHeadModel / BertForMaskedLM
    model = from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    model.save_pretrained("out_dir")

Causal decoders: hidden = model(input_ids, ...) (after the final norm), model.logits(hidden),
model.lm_head_weight, model.loss(input_ids, labels, ...), model.new_kv_cache(batch, max_len).
BERT: hidden = model(input_ids, token_type_ids, attention_mask), model.mlm_head(hidden),
model.mlm_loss(input_ids, labels).
"""

from .bert import BertForMaskedLM
from .checkpoint import from_pretrained, save_pretrained
from .config import PRESETS, BertConfig, GPT2Config, LlamaConfig, config_from_hf_dict, preset
from .gpt2 import GPT2LMHeadModel
from .kv_cache import KVCache
from .llama import LlamaForCausalLM


def build_model(config):
    """A randomly initialised model for a config dataclass."""
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config)
    if isinstance(config, GPT2Config):
        return GPT2LMHeadModel(config)
    if isinstance(config, BertConfig):
        return BertForMaskedLM(config)
    raise TypeError(f"config: expected LlamaConfig, GPT2Config or BertConfig, got {type(config).__name__}")


__all__ = [
    "BertConfig", "BertForMaskedLM", "GPT2Config", "GPT2LMHeadModel", "KVCache", "LlamaConfig",
    "LlamaForCausalLM", "PRESETS", "build_model", "config_from_hf_dict", "from_pretrained", "preset",
    "save_pretrained",
]
