"""The one registry of model types: Hugging Face model_type -> (config class, model class).

Entries name their classes as "module:attribute" strings and import them on first use, so
this module imports no model file and every other module can import it: checkpoint load/save,
`build_model` and `config_from_hf_dict` look classes up here; model files never import the
checkpointer. A model class carries its Hugging Face name mapping (`HFNames` below: which file
tensors to ignore, and how a name and tensor map between the file and the state dict).

Adding a model class is one line in MODEL_TYPES (or `register(...)` for a class defined
elsewhere); a task head (sequence classification / regression / reward, token classification)
is one (kind, class) pair of its trunk's entry, chosen on load by config.json's `architectures`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelType:
    """One Hugging Face model_type: its config class, its default model class and its task
    heads (kind -> class), all as "module:attribute"."""

    config: str
    model: str
    heads: tuple[tuple[str, str], ...] = ()  # (kind, "module:Class"), kind in heads.HEAD_KINDS

    @property
    def config_class(self) -> type:
        return _load(self.config)

    @property
    def model_class(self) -> type:
        return _load(self.model)

    def head_class(self, kind: str) -> type:
        for k, path in self.heads:
            if k == kind:
                return _load(path)
        raise ValueError(f"kind: expected one of {[k for k, _ in self.heads]} for {self.model.rpartition(':')[2]}, "
                         f"got {kind!r}")

    def class_for(self, architectures) -> type:
        """The class a config.json's `architectures` names: a head whose Hugging Face name
        (`<Prefix><hf_suffix>`) ends the architecture, else the default model class."""
        arch = (architectures or [""])[0]
        for _, path in self.heads:
            cls = _load(path)
            if arch.endswith(cls.hf_suffix):
                return cls
        return self.model_class


_HEADS = "fastllm.models.heads:"
_LLAMA = ModelType("fastllm.models.config:LlamaConfig", "fastllm.models.llama:LlamaForCausalLM",
                   (("sequence_classification", _HEADS + "LlamaForSequenceClassification"),))

MODEL_TYPES: dict[str, ModelType] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ModelType("fastllm.models.config:GPT2Config", "fastllm.models.gpt2:GPT2LMHeadModel",
                      (("sequence_classification", _HEADS + "GPT2ForSequenceClassification"),)),
    "bert": ModelType("fastllm.models.config:BertConfig", "fastllm.models.bert:BertForMaskedLM",
                      (("sequence_classification", _HEADS + "BertForSequenceClassification"),
                       ("token_classification", _HEADS + "BertForTokenClassification"))),
}


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def register(model_type: str, config: str, model: str, heads: tuple[tuple[str, str], ...] = ()) -> None:
    """Add (or replace) a model_type: config, model and head classes as "module:attribute"."""
    MODEL_TYPES[model_type] = ModelType(config, model, heads)


def head_class(model_type: str, kind: str) -> type:
    """The task-head class of `kind` ("sequence_classification", "token_classification") on the
    trunk of model_type."""
    return lookup(model_type).head_class(kind)


def lookup(model_type) -> ModelType:
    """The entry of a Hugging Face model_type; the error lists the known ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type: expected one of {list(MODEL_TYPES)}, got {model_type!r}")
    return MODEL_TYPES[model_type]


def types_of(config_class_name: str) -> tuple[str, ...]:
    """The model_types whose config class is named config_class_name (e.g. LlamaConfig)."""
    return tuple(t for t, e in MODEL_TYPES.items() if e.config.rpartition(":")[2] == config_class_name)


def model_class(config) -> type:
    """The default model class for a config dataclass (by its model_type)."""
    entry = lookup(getattr(config, "model_type", None))
    if not isinstance(config, entry.config_class):
        raise TypeError(
            f"config: expected a {entry.config_class.__name__} for model_type {config.model_type!r}, "
            f"got {type(config).__name__}"
        )
    return entry.model_class


def config_from_hf_dict(d: dict):
    """The config dataclass for a Hugging Face config.json dict, chosen by its model_type."""
    return lookup(d.get("model_type")).config_class.from_hf_dict(d)


class HFNames:
    """A model class's Hugging Face name mapping, read by the checkpointer. Subclasses override
    where names or layouts differ from the file (GPT-2 transposes Conv1D weights, BERT renames
    gamma/beta) and list file tensors they ignore in `_ignored_hf` (regular expressions)."""

    _ignored_hf: tuple[str, ...] = ()

    @classmethod
    def _from_hf(cls, name: str, tensor: torch.Tensor, raw: dict, config) -> tuple[str, torch.Tensor] | None:
        """File tensor -> (state-dict name, tensor), or None to drop it after checking."""
        return name, tensor

    @classmethod
    def _to_hf(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """State-dict tensor -> (file name, tensor), or None to leave it out of the file."""
        return name, tensor

    @classmethod
    def _hf_name(cls, name: str) -> str:
        mapped = cls._to_hf(name, torch.empty(0, 0))
        return mapped[0] if mapped else name
