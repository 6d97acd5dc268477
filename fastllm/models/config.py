"""Model configurations: one dataclass per architecture, named presets, and the mapping to
and from Hugging Face's config.json.

    LlamaConfig  - Llama / Mistral / Qwen2 / SmolLM decoders (model_type picks the file format)
    GPT2Config   - GPT-2
    BertConfig   - BERT-style encoder with an MLM head

`preset(name)` returns a fresh config: tiny ones for tests ("tiny-llama", "tiny-qwen2",
"tiny-gpt2", "tiny-bert", ...) and published sizes ("smollm2-135m", "llama-3.2-1b",
"gpt2", "bert-base", ...); `preset(name, **overrides)` changes fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import registry


def _llama_types() -> tuple[str, ...]:
    return registry.types_of("LlamaConfig")  # llama, mistral, qwen2


def _check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


@dataclass
class LlamaConfig:
    """A Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

    head_dim defaults to hidden_size // num_attention_heads; num_key_value_heads defaults to
    num_attention_heads (plain multi-head attention). qkv_bias adds biases to q/k/v (Qwen2);
    o_bias to the output projection (Llama's attention_bias sets both). rope_scaling is None
    or the Llama-3 dict (see fastllm.ops.rope.rope_inv_freq). sliding_window (Mistral) is
    recorded; attention is exact up to that many positions and longer inputs are refused.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: expected a divisor of num_attention_heads="
                f"{self.num_attention_heads}, got {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}"
            )
        if self.model_type not in _llama_types():
            raise ValueError(f"model_type: expected one of {_llama_types()}, got {self.model_type!r}")

    # -- Hugging Face config.json ------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_params = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope_params,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError(
                    "qkv_bias/o_bias: the llama format has one attention_bias; use "
                    "model_type='qwen2' for q/k/v biases alone"
                )
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.qkv_bias is not (self.model_type == "qwen2") or self.o_bias or self.mlp_bias:
            raise ValueError(
                f"model_type {self.model_type!r}: biases must be q/k/v only for qwen2 "
                f"and none for mistral (got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                f"mlp_bias={self.mlp_bias})"
            )
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d.update(
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=self.num_hidden_layers,
            )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in _llama_types():
            raise ValueError(
                f"config.json model_type: expected one of {_llama_types()}, got {model_type!r}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(
                f"config.json hidden_act: only 'silu' is supported, got {d['hidden_act']!r}"
            )
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if (
            scaling is not None
            and scaling.get("rope_type", scaling.get("type", "default")) == "default"
        ):
            scaling = None
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise NotImplementedError(
                "config.json use_sliding_window: Qwen2 sliding-window layers are not supported"
            )
        if model_type == "llama":
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        else:
            qkv_bias, o_bias = model_type == "qwen2", False
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
        )


@dataclass
class GPT2Config:
    """GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh form) MLP of 4 x n_embd
    (n_inner), tied input/output embeddings."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    model_type: str = "gpt2"

    def __post_init__(self):
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        _check_positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_head: expected a divisor of n_embd={self.n_embd}, got {self.n_head}"
            )

    # Uniform names used by the shared decoder code.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPT2Config:
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise NotImplementedError(
                f"config.json activation_function: expected 'gelu_new', "
                f"got {d['activation_function']!r}"
            )
        for key, ok in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("tie_word_embeddings", True),
        ):
            if d.get(key, ok) != ok:
                raise NotImplementedError(
                    f"config.json {key}: only {ok} is supported, got {d[key]!r}"
                )
        return cls(
            vocab_size=d["vocab_size"],
            n_positions=d.get("n_positions", 1024),
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )


@dataclass
class BertConfig:
    """BERT-style encoder: word + position + token-type embeddings, post-LayerNorm blocks,
    GELU (erf) MLP, and an MLM head (dense -> GELU -> LayerNorm -> decoder tied to the word
    embeddings, with its own bias)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    model_type: str = "bert"

    def __post_init__(self):
        _check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: expected a divisor of hidden_size={self.hidden_size}, "
                f"got {self.num_attention_heads}"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "type_vocab_size",
                "layer_norm_eps",
                "initializer_range",
                "pad_token_id",
            )
        }
        return {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            **d,
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        if d.get("hidden_act", "gelu") != "gelu":
            raise NotImplementedError(
                f"config.json hidden_act: only 'gelu' is supported, got {d['hidden_act']!r}"
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(
                "config.json position_embedding_type: only 'absolute' is supported, "
                f"got {d['position_embedding_type']!r}"
            )
        if d.get("tie_word_embeddings", True) is not True:
            raise NotImplementedError(
                "config.json tie_word_embeddings: the MLM decoder must be tied"
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "model_type"]
        return cls(**{k: d[k] for k in names if k in d})


# --------------------------------------------------------------------------- presets
# Each preset is a base plus the fields that differ from it.

_TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_SMOLLM2 = dict(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


def _llama3_scaling(factor: float, original: int) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}


_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    # Tiny configurations for tests: hidden 64, 2 layers, vocab 128.
    "tiny-llama": (LlamaConfig, _TINY_LLAMA),
    "tiny-llama3": (LlamaConfig, dict(_TINY_LLAMA, max_position_embeddings=256, rope_theta=500000.0,
                                      tie_word_embeddings=True, rope_scaling=_llama3_scaling(8.0, 32))),
    "tiny-mistral": (LlamaConfig, dict(_TINY_LLAMA, num_key_value_heads=1, sliding_window=128,
                                       model_type="mistral")),
    "tiny-qwen2": (LlamaConfig, dict(_TINY_LLAMA, qkv_bias=True, tie_word_embeddings=True, model_type="qwen2",
                                     rope_theta=1e6)),
    "tiny-gpt2": (GPT2Config, dict(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0)),
    "tiny-bert": (BertConfig, dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=128)),
    # Published sizes (architecture only; weights come from from_pretrained).
    "smollm2-135m": (LlamaConfig, dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3)),
    "smollm2-360m": (LlamaConfig, dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                       num_attention_heads=15, num_key_value_heads=5)),
    "llama-3.2-1b": (LlamaConfig, dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, head_dim=64, tie_word_embeddings=True,
                                       rope_scaling=_llama3_scaling(32.0, 8192))),
    "llama-3.1-8b": (LlamaConfig, dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, rope_scaling=_llama3_scaling(8.0, 8192))),
    "mistral-7b": (LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                                     model_type="mistral")),
    "qwen2.5-0.5b": (LlamaConfig, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                       tie_word_embeddings=True, qkv_bias=True, model_type="qwen2",
                                       bos_token_id=151643, eos_token_id=151643)),
    "gpt2": (GPT2Config, dict()),
    "gpt2-medium": (GPT2Config, dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": (GPT2Config, dict(n_embd=1280, n_layer=36, n_head=20)),
    "bert-base": (BertConfig, dict()),
    "bert-large": (BertConfig, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096)),
}

PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides):
    """A fresh config for a named preset (see PRESETS), with fields replaced by `overrides`."""
    if name not in _PRESETS:
        raise ValueError(f"name: expected one of {', '.join(PRESETS)}, got {name!r}")
    cls, kwargs = _PRESETS[name]
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}
    return cls(**{**kwargs, **overrides})


__all__ = ["LlamaConfig", "GPT2Config", "BertConfig", "PRESETS", "preset"]
