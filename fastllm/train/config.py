"""Training configurations: plain dataclasses, loadable from YAML, with `key=value` overrides.

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=1e-4", "peft.r=16", "freeze=[embed*]"])
    cfg = SFTConfig(model="tiny-llama", max_steps=100)            # or straight from Python

A YAML file holds the fields of one config (unknown keys are an error). An override
`key=value` parses value as YAML (`lr=3e-4` is a float, `freeze=[a, b]` a list, `peft=null`
None) and sets key; `a.b=value` sets the key b of the dict field a (model_overrides, peft).

Every field carries its one-line meaning in `metadata["help"]` (what `fastllm <command> --help`
prints) and is checked against its annotation when a config is made, however it is made
(Python, YAML or overrides): ints stay ints (and counts are >= their `min`), ints become
floats, a list of two numbers becomes `betas`, a path is a string, a choice is one of its
`choices`; anything else is a ValueError naming the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import yaml


def _field(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING, min=None, max=None,
           choices=None, pattern=None, expect=None):
    """A dataclass field with its help line and value constraints in metadata."""
    meta = {"help": help}
    for key, value in (("min", min), ("max", max), ("choices", choices), ("pattern", pattern), ("expect", expect)):
        if value is not None:
            meta[key] = value
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


@dataclass
class TrainConfig:
    """What every loop shares. Batch sizes are per process; one optimizer step sees
    batch_size * grad_accum * world_size examples (blocks)."""

    # model
    model: str = _field("tiny-llama", "a preset name (fastllm.models.PRESETS) or a Hugging Face checkpoint dir")
    model_overrides: dict = _field(factory=dict, help="preset fields to replace, e.g. {num_hidden_layers: 4}")
    tokenizer: str | None = _field(None, "tokenizer dir/file; null: the checkpoint's, else one trained on the data")
    tokenizer_vocab_size: int = _field(1000, "vocabulary of a tokenizer trained here", min=1)
    # optimisation
    max_steps: int = _field(100, "optimizer steps to train for", min=1)
    batch_size: int = _field(8, "examples (blocks) per micro-batch, per process", min=1)
    grad_accum: int = _field(1, "micro-batches per optimizer step", min=1)
    lr: float = _field(3e-4, "peak learning rate", min=0.0)
    min_lr_ratio: float = _field(0.1, "the schedule ends at lr * min_lr_ratio", min=0.0, max=1.0)
    warmup_steps: int = _field(10, "steps of linear warm-up from 0 to lr", min=0)
    schedule: str = _field("cosine", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _field(0.1, "AdamW weight decay (not on norms and biases)", min=0.0)
    betas: tuple[float, float] = _field((0.9, 0.95), "AdamW betas [beta1, beta2]", min=0.0,
                                        max=1.0)
    eps: float = _field(1e-8, "AdamW epsilon", min=0.0)
    max_grad_norm: float | None = _field(1.0, "gradient-norm clip; null or 0: no clipping", min=0.0)
    # numerics and memory
    device: str = _field("auto", "auto | cpu | cuda | cuda:N", pattern=r"auto|cpu|cuda(:\d+)?",
                        expect="auto, cpu, cuda or cuda:N")
    dtype: str = _field("auto", "autocast dtype: auto (bfloat16 on GPU, float32 on CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    activation_checkpointing: bool = _field(False, "recompute each block's activations in the backward")
    distributed: str = _field("auto", "auto (ddp under torchrun) | none | ddp | fsdp",
                              choices=("auto", "none", "ddp", "fsdp"))
    # evaluation, logging, checkpoints
    eval_every: int = _field(0, "steps between evaluations (0: only at the end)", min=0)
    eval_batches: int = _field(8, "batches per evaluation (0: no evaluation)", min=0)
    eval_fraction: float = _field(0.05, "held-out share of the data", min=0.0, max=1.0)
    log_every: int = _field(1, "steps between metric lines", min=1)
    output_dir: str = _field("runs/out", "directory for checkpoints, metrics, the final model")
    save_every: int = _field(0, "steps between checkpoints (0: only at the end)", min=0)
    keep_last: int = _field(2, "checkpoints kept on disk (0: all)", min=0)
    resume: str | None = _field("auto", "auto (newest complete checkpoint in output_dir, if any) | a checkpoint "
                                "dir | null")
    progress: bool = _field(True, "show a progress bar")
    plot: bool = _field(True, "write loss_curve.png at the end (needs matplotlib)")
    seed: int = _field(0, "seed of weights, data order and masking", min=0)

    def __post_init__(self):
        check_fields(self)


@dataclass
class PretrainConfig(TrainConfig):
    """Causal LM (next token) or masked LM on fixed-length blocks of a packed token stream."""

    objective: str = _field("causal", "causal (decoder models) | mlm (encoder models)", choices=("causal", "mlm"))
    data: str | list[str] = _field("shakespeare", "a shipped corpus name, text file path(s), or a tokenised .bin")
    bin_dtype: str = _field("uint16", "element type of a .bin token file",
                            choices=("uint8", "uint16", "int16", "uint32", "int32", "int64"))
    seq_len: int = _field(128, "tokens per training block", min=2)
    doc_boundaries: bool = _field(True, "positions and attention stay inside documents (causal LM)")
    mask_prob: float = _field(0.15, "share of tokens masked (masked LM)", min=0.0, max=1.0)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on chat examples; only response tokens carry loss."""

    data: str = _field("instructions", "the shipped instruction set, or a .jsonl/.json file of records")
    max_length: int = _field(256, "longest example in tokens", min=2)
    too_long: str = _field("error", "what to do with a longer example", choices=("error", "truncate", "skip"))
    system: str | None = _field(None, "system message put first in every conversation")
    packing: bool = _field(True, "one row of concatenated examples, varlen attention (else padded rows)")
    freeze: list[str] = _field(factory=list, help="parameter-name globs to freeze (\"*embed*\", \"model.layers.0.*\")")
    train_layers: str | None = _field(None, "\"a:b\": train only decoder layers a..b-1, freeze everything else",
                                      pattern=r"\d+:\d+", expect="\"a:b\" (first and end layer index)")
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}")
    lr: float = _field(1e-4, "peak learning rate", min=0.0)
    warmup_steps: int = _field(5, "steps of linear warm-up from 0 to lr", min=0)


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (DPO, IPO, conservative DPO) on prompt/chosen/rejected pairs.
    The loss is a mean over pairs; batch_size counts pairs."""

    data: str = _field("preferences", "the shipped preference set, or a .jsonl/.json file of "
                       "{prompt, chosen, rejected}")
    max_length: int = _field(256, "longest prompt + response in tokens (each side of a pair)", min=2)
    too_long: str = _field("error", "what to do with a longer pair", choices=("error", "truncate", "skip"))
    system: str | None = _field(None, "system message put first in every conversation")
    beta: float = _field(0.1, "strength of the KL leash to the reference (implicit reward = beta * log-ratio)",
                         min=0.0)
    loss_type: str = _field("sigmoid", "sigmoid: DPO (cDPO with label_smoothing > 0); ipo: IPO",
                            choices=("sigmoid", "ipo"))
    label_smoothing: float = _field(0.0, "cDPO: probability that a pair's label is flipped", min=0.0, max=0.5)
    reference: str = _field("precomputed", "reference log-probs computed once before training (eval mode), or "
                            "live every step", choices=("precomputed", "live"))
    freeze: list[str] = _field(factory=list, help="parameter-name globs to freeze")
    train_layers: str | None = _field(None, "\"a:b\": train only decoder layers a..b-1, freeze everything else",
                                      pattern=r"\d+:\d+", expect="\"a:b\" (first and end layer index)")
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8, alpha: 16}; the reference is then the base with "
                               "adapters off")
    lr: float = _field(1e-6, "peak learning rate", min=0.0)
    warmup_steps: int = _field(5, "steps of linear warm-up from 0 to lr", min=0)


@dataclass
class RewardConfig(TrainConfig):
    """A reward model: a decoder plus a scalar head read at the last real token (the EOS) of
    prompt + response, trained with the Bradley-Terry loss on prompt/chosen/rejected pairs. The
    loss is a mean over pairs; batch_size counts pairs."""

    data: str = _field("preferences", "the shipped preference set, or a .jsonl/.json file of "
                       "{prompt, chosen, rejected}")
    max_length: int = _field(256, "longest prompt + response in tokens (each side of a pair)", min=2)
    too_long: str = _field("error", "what to do with a longer pair", choices=("error", "truncate", "skip"))
    system: str | None = _field(None, "system message put first in every conversation")
    margin: float | str = _field(0.0, "Bradley-Terry margin m in -log sigmoid(r_c - r_r - m): a constant, or the "
                                 "name of a numeric field every record carries (e.g. margin)")
    normalize: bool = _field(True, "after training, store the mean/std of the rewards of reference pairs so "
                             "predict() and the scorer return rewards with mean 0 and std 1 on them")
    normalize_samples: int = _field(512, "pairs (both sides scored) the normalisation is measured on: held-out "
                                    "pairs, else training pairs", min=1)
    freeze: list[str] = _field(factory=list, help="parameter-name globs to freeze (the score head stays trained "
                               "unless a glob names it)")
    train_layers: str | None = _field(None, "\"a:b\": train only decoder layers a..b-1 and the score head",
                                      pattern=r"\d+:\d+", expect="\"a:b\" (first and end layer index)")
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8, alpha: 16}; the score head is trained too and the "
                               "export is the merged model")
    lr: float = _field(1e-5, "peak learning rate", min=0.0)
    warmup_steps: int = _field(5, "steps of linear warm-up from 0 to lr", min=0)


@dataclass
class FinetuneConfig(TrainConfig):
    """Task fine-tuning: a classification, regression or token-classification head on a
    pre-trained trunk (or a preset). batch_size counts sequences; the loss is a mean over
    sequences (over tagged words for token classification)."""

    task: str = _field("classification", "what the head predicts",
                       choices=("classification", "regression", "token_classification"))
    data: str = _field("topics", "a shipped set (topics, sentiment, entities) or a .csv/.jsonl/.json file")
    columns: dict = _field(factory=dict, help="our field -> the file's column: text, label (sequence tasks), "
                           "tokens, tags (token_classification), e.g. {text: sentence, label: score}")
    labels: list[str] | None = _field(None, "class or tag names in id order (config.json id2label); null: the "
                                      "names found in the data, sorted")
    num_labels: int | None = _field(None, "number of classes when the labels are integer ids; null: from labels "
                                    "or the data", min=1)
    pooling: str | None = _field(None, "sequence heads: last (decoders), cls or mean (BERT); null: the model's "
                                 "default", choices=("last", "cls", "mean"))
    class_weights: list[float] | None = _field(None, "classification: one loss weight per class", min=0.0)
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing", min=0.0, max=1.0)
    standardize: bool = _field(True, "regression: train on (y - mean) / std of the training targets; the "
                               "stored mean/std map predictions back")
    max_length: int = _field(128, "longest input in tokens (longer texts are truncated; a longer tagged "
                             "sentence is an error)", min=3)
    eval_fraction: float = _field(0.2, "held-out share of the data", min=0.0, max=1.0)
    freeze: list[str] = _field(factory=list, help="parameter-name globs to freeze (the head stays trainable "
                               "unless named here)")
    train_layers: str | None = _field(None, "\"a:b\": train only layers a..b-1 and the head",
                                      pattern=r"\d+:\d+", expect="\"a:b\" (first and end layer index)")
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8, alpha: 16}; the head stays trainable and is "
                               "saved with the adapter (modules_to_save)")
    lr: float = _field(1e-4, "peak learning rate", min=0.0)
    warmup_steps: int = _field(5, "steps of linear warm-up from 0 to lr", min=0)


@dataclass
class PPOConfig(TrainConfig):
    """PPO on the policy's own rollouts against a reward model and/or a reward function.
    A step is one iteration: batch_size prompts per process are rolled out and scored, then
    ppo_epochs passes of num_minibatches optimizer steps (each over grad_accum micro-batches)."""

    data: str = _field("instructions", "prompts: the shipped instruction set, or a .jsonl/.json file of records "
                       "with a prompt (or messages)")
    system: str | None = _field(None, "system message put first in every prompt")
    max_prompt_length: int = _field(128, "longer prompts are left out", min=1)
    max_new_tokens: int = _field(64, "response length limit (tokens)", min=1)
    temperature: float = _field(1.0, "sampling temperature; log-probs and entropy use the same", min=1e-6)
    top_k: int = _field(0, "sample among the k likeliest tokens (0: off)", min=0)
    top_p: float = _field(1.0, "nucleus sampling threshold (1: off)", min=0.0, max=1.0)
    reward_model: str | None = _field(None, "a reward-model checkpoint dir (a sequence-classification head)")
    reward_fn: str | None = _field(None, "\"module:function\" called with (prompts, responses) as token-id lists, "
                                   "returning one float each (added to the reward model's score)")
    no_eos_score: float | None = _field(-1.0, "score of a response that ended without EOS (null: keep its score)")
    kl_coef: float = _field(0.05, "beta: weight of the KL to the reference (initial value when adaptive)", min=0.0)
    kl_estimator: str = _field("k1", "per-token KL estimator", choices=("k1", "k3"))
    kl_penalty: str = _field("reward", "where the KL enters: per-token reward, or a loss term (importance-"
                             "weighted, so its gradient is that of KL(pi || ref))", choices=("reward", "loss"))
    kl_target: float | None = _field(None, "adaptive beta (Ziegler et al.): the per-sequence KL to hold; null: fixed",
                                     min=0.0)
    kl_horizon: float = _field(10000.0, "adaptive beta: horizon in sequences", min=1.0)
    critic: str = _field("separate", "value model: a separate critic (the reward model's copy, else the policy "
                         "trunk + a zero head) or a head on the policy trunk", choices=("separate", "shared"))
    gamma: float = _field(1.0, "GAE discount", min=0.0, max=1.0)
    lam: float = _field(0.95, "GAE lambda", min=0.0, max=1.0)
    whiten_rewards: bool = _field(False, "whiten the per-token rewards of each rollout (changes beta's scale)")
    whiten_advantages: bool = _field(True, "whiten the advantages of each rollout (all ranks pooled)")
    ppo_epochs: int = _field(4, "passes over each rollout", min=1)
    num_minibatches: int = _field(1, "optimizer steps per pass (batch_size must divide by num_minibatches * "
                                  "grad_accum)", min=1)
    clip_eps: float = _field(0.2, "policy ratio clip", min=0.0, max=1.0)
    clip_eps_value: float | None = _field(0.2, "value clip around the rollout's values (null: no clip)", min=0.0)
    vf_coef: float = _field(0.1, "value-loss weight", min=0.0)
    entropy_coef: float = _field(0.0, "entropy bonus weight", min=0.0)
    loss_aggregation: str = _field("token_mean", "how token losses are normalised (fastllm.rl.aggregate)",
                                   choices=("token_mean", "seq_mean", "seq_sum_norm"))
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8}; the reference is then the base with adapters off")
    batch_size: int = _field(8, "prompts rolled out per iteration, per process", min=1)
    lr: float = _field(1e-5, "peak learning rate", min=0.0)
    warmup_steps: int = _field(0, "iterations of linear warm-up", min=0)
    schedule: str = _field("constant", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _field(0.0, "AdamW weight decay (not on norms and biases)", min=0.0)
    eval_batches: int = _field(0, "unused by PPO (no held-out loss)", min=0)


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO / RLOO on groups of the policy's own samples, no critic. A step is one iteration:
    batch_size prompts per process, num_generations samples each, scored and given group-relative
    advantages, then num_iterations passes of num_minibatches optimizer steps (each over
    grad_accum micro-batches) over the batch_size * num_generations rows."""

    data: str = _field("instructions", "prompts: the shipped instruction set, or a .jsonl/.json file of records "
                       "with a prompt (or messages)")
    system: str | None = _field(None, "system message put first in every prompt")
    max_prompt_length: int = _field(128, "longer prompts are left out", min=1)
    max_new_tokens: int = _field(64, "response length limit (tokens)", min=1)
    num_generations: int = _field(4, "G: samples per prompt (one group)", min=2)
    temperature: float = _field(1.0, "sampling temperature; log-probs use the same", min=1e-6)
    top_k: int = _field(0, "sample among the k likeliest tokens (0: off)", min=0)
    top_p: float = _field(1.0, "nucleus sampling threshold (1: off)", min=0.0, max=1.0)
    reward_model: str | None = _field(None, "a reward-model checkpoint dir (a sequence-classification head)")
    reward_funcs: list[str] = _field(factory=list, help="\"module:function\" reward functions called with "
                                     "(prompts, responses), returning one float each; summed with reward_weights")
    reward_weights: list[float] | None = _field(None, "one weight per reward function (null: all 1)")
    reward_inputs: str = _field("tokens", "what reward functions receive: token-id lists, or decoded text",
                                choices=("tokens", "text"))
    no_eos_score: float | None = _field(None, "score of a response that ended without EOS (null: keep its score)")
    advantage: str = _field("grpo", "grpo: (r - group mean) [/ group std]; rloo: leave-one-out baseline "
                            "(unbiased, keeps pi_ref exp(r / beta) as the optimum)", choices=("grpo", "rloo"))
    scale_rewards: bool = _field(True, "grpo: divide by the group's std (false: Dr. GRPO)")
    beta: float = _field(0.04, "weight of the k3 KL-to-reference loss term (0: no reference model)", min=0.0)
    kl_weighted: bool = _field(True, "importance-weight the k3 term (pi / pi_old) so its gradient is that of "
                               "KL(pi || ref); false: the GRPO paper's k3, whose gradient is that of KL(ref || pi)")
    epsilon: float = _field(0.2, "policy ratio clip (low side)", min=0.0, max=1.0)
    epsilon_high: float | None = _field(None, "upper ratio clip (DAPO clip-higher; null: epsilon)", min=0.0)
    loss_type: str = _field("token_mean", "token-loss aggregation: token_mean (DAPO: over all tokens), seq_mean "
                            "(GRPO paper: per sequence, then over sequences), seq_sum_norm (Dr. GRPO: token sum / "
                            "(rows x max_new_tokens))", choices=("token_mean", "seq_mean", "seq_sum_norm"))
    num_iterations: int = _field(1, "mu: passes over each rollout (1: on-policy, ratio 1)", min=1)
    num_minibatches: int = _field(1, "optimizer steps per pass (batch_size * num_generations must divide by "
                                  "num_minibatches * grad_accum)", min=1)
    peft: dict | None = _field(None, "e.g. {method: lora, r: 8}; the reference is then the base with adapters off")
    batch_size: int = _field(8, "prompts per iteration, per process (each sampled num_generations times)", min=1)
    lr: float = _field(1e-6, "peak learning rate", min=0.0)
    warmup_steps: int = _field(0, "iterations of linear warm-up", min=0)
    schedule: str = _field("constant", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _field(0.0, "AdamW weight decay (not on norms and biases)", min=0.0)
    eval_batches: int = _field(0, "unused by GRPO (no held-out loss)", min=0)


CONFIGS = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig,
           "ppo": PPOConfig, "finetune": FinetuneConfig, "grpo": GRPOConfig}


# --------------------------------------------------------------------------- type checks


def type_name(tp) -> str:
    """A reader's name for an annotation: 'an integer', 'a string or null', 'a list of 2 numbers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'values'}"
    if origin is list or tp is list:
        return f"a list of {type_name(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _short_type(tp) -> str:
    """The compact form for --help: str, int, float | null, list[str], [float, float]."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_short_type(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_short_type(a) for a in args) + "]"
    if origin is list:
        return f"list[{_short_type(args[0])}]"
    return "null" if tp is type(None) else "any" if tp is Any else getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce_to(value: Any, tp) -> Any:
    """value converted to annotation tp, or _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce_to(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _Mismatch
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise _Mismatch
        return tuple(_coerce_to(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is list or tp is list:
        if isinstance(value, (str, os.PathLike)) and args:  # one item for a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce_to(v, args[0]) for v in value] if args else list(value)
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    return value


def _check_range(name: str, value: Any, meta) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            raise ValueError(f"{name}: expected a value {bounds}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ValueError(f"{name}: expected one of {' | '.join(choices)}, got {value!r}")
    pattern = meta.get("pattern")
    if pattern is not None and isinstance(value, str) and not re.fullmatch(pattern, value):
        raise ValueError(f"{name}: expected {meta.get('expect', pattern)}, got {value!r}")


def check_fields(config) -> None:
    """Coerce every field of `config` to its annotation in place and check its range; then the
    keys of the dict fields peft and model_overrides."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        try:
            coerced = _coerce_to(value, hints[f.name])
        except _Mismatch:
            what = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
            raise ValueError(f"{f.name}: expected {type_name(hints[f.name])}{what}, got {value!r} "
                             f"({type(value).__name__})") from None
        _check_range(f.name, coerced, f.metadata)
        object.__setattr__(config, f.name, coerced)
    _check_model_overrides(config)
    if getattr(config, "peft", None):
        check_peft_spec(config.peft)


def _check_model_overrides(config) -> None:
    if not config.model_overrides:
        return
    if os.path.isdir(config.model):
        raise ValueError(f"model_overrides: only apply to a preset model, but model={config.model!r} is a "
                         f"checkpoint directory (its config.json fixes the architecture); got "
                         f"{sorted(config.model_overrides)}")
    from fastllm.models import PRESETS, preset

    if config.model not in PRESETS:
        return  # build.get_model names the unknown model
    valid = {f.name for f in dataclasses.fields(preset(config.model))}
    unknown = sorted(set(config.model_overrides) - valid)
    if unknown:
        raise ValueError(f"model_overrides: {', '.join(map(str, unknown))} not a field of the {config.model!r} "
                         f"config ({type(preset(config.model)).__name__}); valid keys: {', '.join(sorted(valid))}")


def peft_keys(method: str) -> list[str]:
    """The keys a `peft` spec with this method takes: the keyword arguments of
    fastllm.peft.apply_<method> after the model."""
    import inspect

    import fastllm.peft as peft

    fn = getattr(peft, f"apply_{method}", None)
    if fn is None:
        known = sorted(n[len("apply_"):] for n in dir(peft) if n.startswith("apply_"))
        raise ValueError(f"peft.method: expected one of {', '.join(known)}, got {method!r}")
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_peft_spec(spec: dict) -> None:
    """`peft` must name a known method and only keyword arguments of its apply function."""
    method = spec.get("method", "lora")
    if not isinstance(method, str):
        raise ValueError(f"peft.method: expected a string, got {method!r}")
    valid = peft_keys(method)
    unknown = sorted(str(k) for k in spec if k != "method" and k not in valid)
    if unknown:
        raise ValueError(f"peft: {', '.join(f'peft.{k}' for k in unknown)} not an argument of "
                         f"fastllm.peft.apply_{method}; valid keys: method, {', '.join(valid)}")


def describe_fields(cls) -> str:
    """One line per field of a config class: name, type, default and meaning (the text of
    `fastllm <command> --help`, made from the dataclass itself so it cannot drift)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = list(default) if isinstance(default, tuple) else default
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        meaning = f.metadata.get("help", "")
        if "choices" in f.metadata and "|" not in meaning:
            meaning += f" ({' | '.join(f.metadata['choices'])})"
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None or hi is not None:
            meaning += f" [{'>= ' + str(lo) if hi is None else f'{lo}..{hi}'}]"
        rows.append((f.name, _short_type(hints[f.name]), shown, meaning))
    w_name = max(len(r[0]) for r in rows)
    w_type = max(len(r[1]) for r in rows)
    lines = [f"  {n:<{w_name}}  {t:<{w_type}}  default {d}: {h}" for n, t, d, h in rows]
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(config, overrides: list[str] | dict) -> Any:
    """A copy of `config` with overrides applied: ["key=value", "dict_field.key=value"] or a dict."""
    cls = type(config)
    names = {f.name for f in dataclasses.fields(cls)}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    changes: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str):
            raise ValueError(f"{key!r}: not a field of {cls.__name__}; fields are {', '.join(sorted(names))}")
        top, _, sub = key.partition(".")
        if top not in names:
            raise ValueError(f"{key}: not a field of {cls.__name__}; fields are {', '.join(sorted(names))}")
        if sub:
            current = changes.get(top, getattr(config, top))
            if current is not None and not isinstance(current, dict):
                raise ValueError(f"{key}: {top} is not a mapping (it is {type(current).__name__}), so it has no "
                                 f"key {sub!r}")
            current = dict(current or {})
            current[sub] = value
            changes[top] = current
        else:
            changes[top] = value
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
