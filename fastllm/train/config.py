"""Training configurations: plain dataclasses, loadable from YAML, with `key=value` overrides.

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=1e-4", "peft.r=16", "freeze=[embed*]"])
    cfg = SFTConfig(model="tiny-llama", max_steps=100)            # or straight from Python

A YAML file holds the fields of one config (unknown keys are an error). An override
`key=value` parses value as YAML (`lr=3e-4` is a float, `freeze=[a, b]` a list, `peft=null`
None) and sets key; `a.b=value` sets the key b of the dict field a (model_overrides, peft).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class TrainConfig:
    """What every loop shares. Batch sizes are per process; one optimizer step sees
    batch_size * grad_accum * world_size examples (blocks)."""

    # model
    model: str = "tiny-llama"  # a preset name (fastllm.models.PRESETS) or a Hugging Face checkpoint dir
    model_overrides: dict = field(default_factory=dict)  # preset fields to replace, e.g. {num_hidden_layers: 4}
    tokenizer: str | None = None  # tokenizer dir/file; None: the checkpoint's, else one trained on the data
    tokenizer_vocab_size: int = 1000  # vocabulary of a tokenizer trained here
    # optimisation
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    # numerics and memory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16
    activation_checkpointing: bool = False
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp
    # evaluation, logging, checkpoints
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 8  # batches per evaluation (0: no evaluation)
    eval_fraction: float = 0.05  # held-out share of the data
    log_every: int = 1
    output_dir: str = "runs/out"
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    resume: str | None = "auto"  # auto (latest checkpoint in output_dir, if any) | a checkpoint dir | None
    progress: bool = True
    plot: bool = True  # write loss_curve.png at the end (needs matplotlib)
    seed: int = 0


@dataclass
class PretrainConfig(TrainConfig):
    """Causal LM (next token) or masked LM on fixed-length blocks of a packed token stream."""

    objective: str = "causal"  # causal | mlm
    data: Any = "shakespeare"  # a shipped corpus name, text file path(s), or a tokenised .bin
    bin_dtype: str = "uint16"  # element type of a .bin token file
    seq_len: int = 128
    doc_boundaries: bool = True  # positions and attention stay inside documents (causal LM)
    mask_prob: float = 0.15  # masked LM


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on chat examples; only response tokens carry loss."""

    data: Any = "instructions"  # the shipped instruction set, or a .jsonl path of records
    max_length: int = 256  # longest example in tokens
    too_long: str = "error"  # error | truncate | skip
    system: str | None = None  # system message put first in every conversation
    packing: bool = True  # one row of concatenated examples, varlen attention (else padded rows)
    freeze: list = field(default_factory=list)  # parameter-name globs to freeze ("*embed*", "model.layers.0.*")
    train_layers: str | None = None  # "a:b": train only decoder layers a..b-1, freeze everything else
    peft: dict | None = None  # e.g. {method: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}
    lr: float = 1e-4
    warmup_steps: int = 5


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (DPO, IPO, conservative DPO) on prompt/chosen/rejected pairs.
    The loss is a mean over pairs; batch_size counts pairs."""

    data: Any = "preferences"  # the shipped preference set, or a .jsonl/.json path of {prompt, chosen, rejected}
    max_length: int = 256  # longest prompt + response in tokens (each side of a pair)
    too_long: str = "error"  # error | truncate | skip
    system: str | None = None  # system message put first in every conversation
    beta: float = 0.1  # strength of the KL leash to the reference (implicit reward = beta * log-ratio)
    loss_type: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing > 0) | ipo
    label_smoothing: float = 0.0  # cDPO: probability that a pair's label is flipped, in [0, 0.5)
    reference: str = "precomputed"  # precomputed (once, eval mode, before training) | live (every step)
    freeze: list = field(default_factory=list)  # parameter-name globs to freeze
    train_layers: str | None = None  # "a:b": train only decoder layers a..b-1
    peft: dict | None = None  # e.g. {method: lora, r: 8, alpha: 16}; the reference is then the base, adapters off
    lr: float = 1e-6
    warmup_steps: int = 5


CONFIGS = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def _coerce(cls, name: str, value: Any) -> Any:
    """Light type checks so that a typo fails here, not deep inside the loop."""
    default = {f.name: f for f in dataclasses.fields(cls)}[name]
    proto = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if isinstance(proto, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(proto, float) and not isinstance(value, bool):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, int):
            return float(value)
    if isinstance(proto, bool) and not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    wants_int = isinstance(proto, int) and not isinstance(proto, bool)
    if wants_int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return value


def apply_overrides(config, overrides: list[str] | dict) -> Any:
    """A copy of `config` with overrides applied: ["key=value", "dict_field.key=value"] or a dict."""
    cls = type(config)
    names = {f.name for f in dataclasses.fields(cls)}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    changes: dict[str, Any] = {}
    for key, value in items:
        top, _, sub = key.partition(".")
        if top not in names:
            raise ValueError(f"{key}: not a field of {cls.__name__}; fields are {', '.join(sorted(names))}")
        if sub:
            current = changes.get(top, getattr(config, top))
            current = dict(current or {})
            current[sub] = value
            changes[top] = current
        else:
            changes[top] = _coerce(cls, top, value) if value is not None else None
    return dataclasses.replace(config, **changes)


def _split(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override: expected key=value, got {item!r}")
    return key.strip(), _parse_value(value)


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | dict = ()):
    """cls (PretrainConfig / SFTConfig) from a YAML file (or defaults) plus overrides."""
    config = cls()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        config = apply_overrides(config, data)
    return apply_overrides(config, overrides)


def save_config(config, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def to_dict(config) -> dict:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def as_config(cls, config):
    """Accept a config object, a YAML path, a dict of fields, or None (defaults)."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(cls, config)
    if isinstance(config, dict):
        return apply_overrides(cls(), config)
    raise TypeError(f"config: expected {cls.__name__}, a YAML path or a dict, got {type(config).__name__}")
