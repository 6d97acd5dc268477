"""Task heads on the shared trunks: sequence classification / regression / reward (decoders and
BERT) and token classification (BERT), saved in the layouts transformers loads.

    head = TaskHead(num_labels=3, problem_type="single_label_classification", id2label={0: "neg", ...})
    model = build_head_model(preset("tiny-llama"), "sequence_classification", head)
    model = from_pretrained("sft_dir", cls=LlamaForSequenceClassification, head=TaskHead(num_labels=1))
    scores = model.scores(input_ids, attention_mask=mask)       # (B, num_labels) float32
    loss = model.loss(input_ids, labels, attention_mask=mask)   # CE, or MSE for regression

A head model is its trunk's model class with the language-model head replaced by a small one
(`score` on decoders, `classifier` on BERT), so forward, packing (cu_seqlens), activation
checkpointing, PEFT targets and the Hugging Face names of the trunk are the trunk's own:

    class                           file layout (transformers class)       reads the hidden state at
    LlamaForSequenceClassification  model.* + score.weight                 the last real token
    GPT2ForSequenceClassification   transformer.* + score.weight           the last real token
    BertForSequenceClassification   bert.* (with pooler) + classifier.*    [CLS] through the pooler
    BertForTokenClassification      bert.* (no pooler) + classifier.*      every token

"Last real token" is the last position whose attention_mask is 1 (left or right padding), the
last token of each packed sequence with cu_seqlens, else the last position: the EOS of prompt +
response, never a pad after it. Transformers finds it from config.json's pad_token_id (the
rightmost token that is not pad), which `TaskHead.pad_token_id` writes; the two agree whenever
pad_token_id is not a real token of the sequence.

Losses are the one entries of fastllm.ops (classification_loss, regression_loss,
token_classification_loss). A regression head's outputs pass through one affine map stored in
config.json, `predict() = scores() * output_scale + output_shift`: standardised regression
targets store (scale, shift) = (std, mean) and train on (y - mean) / std; a reward model stores
its normalisation (1 / sigma, -mu / sigma) so `predict()` gives rewards of mean 0 and std 1 on
its reference samples. Raw `scores()` are what transformers computes (it does not read the map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastllm.ops import classification_loss, regression_loss, token_classification_loss

from .bert import BertForMaskedLM
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM

PROBLEM_TYPES = ("single_label_classification", "regression")


@dataclass
class TaskHead:
    """What a head predicts, stored in config.json next to the trunk's fields.

    num_labels: classes (classification, token tags) or outputs (regression; 1 for a reward model).
    problem_type: "single_label_classification" or "regression" (sequence heads).
    id2label: class names (config.json id2label / label2id).
    pooling: "last" (decoders), "cls" (BERT's pooler on [CLS]) or "mean" (BERT: masked mean of
        the tokens; transformers has no such head and would read [CLS] instead).
    output_scale, output_shift: the affine map of `predict()` for regression heads (None: none):
        predict = raw * output_scale + output_shift; regression targets train as
        (y - output_shift) / output_scale.
    pad_token_id: written to config.json so transformers finds the last real token.
    """

    num_labels: int = 1
    problem_type: str = "regression"
    id2label: dict[int, str] | None = None
    pooling: str = "last"
    output_scale: float | None = None
    output_shift: float | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"num_labels: expected a positive integer, got {self.num_labels!r}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type: expected one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.pooling not in ("last", "cls", "mean"):
            raise ValueError(f"pooling: expected 'last', 'cls' or 'mean', got {self.pooling!r}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if sorted(self.id2label) != list(range(self.num_labels)):
                raise ValueError(f"id2label: expected names for ids 0..{self.num_labels - 1}, "
                                 f"got ids {sorted(self.id2label)}")
        if (self.output_scale is None) != (self.output_shift is None):
            raise ValueError("output_scale, output_shift: give both or neither")
        if self.output_scale is not None and not self.output_scale > 0:
            raise ValueError(f"output_scale: expected a positive number, got {self.output_scale!r}")

    @property
    def labels(self) -> dict[int, str]:
        return self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}

    def to_hf(self) -> dict:
        names = self.labels
        extra = {k: v for k, v in (("pooling", self.pooling), ("output_scale", self.output_scale),
                                   ("output_shift", self.output_shift)) if v is not None}
        d = {"num_labels": self.num_labels, "id2label": {str(i): n for i, n in names.items()},
             "label2id": {n: i for i, n in names.items()}, "problem_type": self.problem_type,
             "fastllm_head": extra}
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        return d

    @classmethod
    def from_hf(cls, d: dict, default_pooling: str) -> TaskHead:
        extra = d.get("fastllm_head") or {}
        id2label = d.get("id2label")
        num_labels = len(id2label) if id2label else int(d.get("num_labels", 2))  # transformers' default
        return cls(num_labels=num_labels, problem_type=d.get("problem_type") or "single_label_classification",
                   id2label={int(k): v for k, v in id2label.items()} if id2label else None,
                   pooling=extra.get("pooling", default_pooling), output_scale=extra.get("output_scale"),
                   output_shift=extra.get("output_shift"), pad_token_id=d.get("pad_token_id"))


def last_token_index(shape: tuple[int, int], attention_mask: Tensor | None = None,
                     cu_seqlens: Tensor | None = None, device=None) -> Tensor:
    """Row indices into the flattened (B*T) hidden states of each sequence's last real token."""
    B, T = shape
    if cu_seqlens is not None:
        return cu_seqlens[1:].long().to(device) - 1
    if attention_mask is None:
        return torch.arange(B, device=device) * T + (T - 1)
    positions = torch.arange(T, device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(-1)  # the rightmost 1 (left or right padding)
    return (torch.arange(B, device=attention_mask.device) * T + last).to(device)


class _SequenceHead:
    """scores / loss / predict of the sequence heads (a mixin before the trunk's class)."""

    head: TaskHead
    head_param_prefixes: tuple[str, ...] = ()  # parameters a new head starts from (random)

    def _pooled(self, input_ids: Tensor, attention_mask, cu_seqlens, kwargs) -> Tensor:
        hidden = self(input_ids, attention_mask=attention_mask, cu_seqlens=cu_seqlens, **kwargs)
        flat = hidden.reshape(-1, hidden.shape[-1])
        idx = last_token_index(tuple(input_ids.reshape(-1, input_ids.shape[-1]).shape), attention_mask,
                               cu_seqlens, hidden.device)
        return flat.index_select(0, idx)  # (B, H)

    def scores(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
               cu_seqlens: Tensor | None = None, **kwargs) -> Tensor:
        """(B, num_labels) float32 raw head outputs at each sequence's last real token (B = the
        number of packed sequences with cu_seqlens): logits, or standardised regression values."""
        return self.score(self._pooled(input_ids, attention_mask, cu_seqlens, kwargs)).float()

    def token_scores(self, hidden: Tensor) -> Tensor:
        """The head on every position of forward's hidden states: (..., num_labels) float32
        (a PPO critic's per-token values)."""
        return self.score(hidden).float()

    def loss(self, input_ids: Tensor, labels: Tensor, *, reduction: str = "mean",
             class_weights: Tensor | None = None, label_smoothing: float = 0.0, **kwargs) -> Tensor:
        """Classification: cross-entropy against (B,) class ids. Regression: mean squared error
        against (B,) or (B, num_labels) targets, mapped to (y - output_shift) / output_scale if set."""
        out = self.scores(input_ids, **kwargs)
        if self.head.problem_type == "regression":
            target = labels.to(out.dtype)
            if self.head.output_scale is not None:
                target = (target - self.head.output_shift) / self.head.output_scale
            return regression_loss(out.squeeze(-1) if target.dim() == 1 else out, target, reduction=reduction)
        return classification_loss(out, labels, class_weights=class_weights, label_smoothing=label_smoothing,
                                   reduction=reduction)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Class ids (B,) for classification; scores * output_scale + output_shift, (B,) or
        (B, num_labels), for regression and reward models."""
        out = self.scores(input_ids, **kwargs)
        if self.head.problem_type != "regression":
            return out.argmax(-1)
        if self.head.output_scale is not None:
            out = out * self.head.output_scale + self.head.output_shift
        return out.squeeze(-1) if self.head.num_labels == 1 else out

    def logits(self, hidden: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no language-model head: use scores() / token_scores()")

    def hf_config_extra(self) -> dict:
        prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2", "bert": "Bert"}
        d = self.head.to_hf()
        d["architectures"] = [prefix[self.config.model_type] + self.hf_suffix]
        return d


def _init_linear(linear: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class LlamaForSequenceClassification(_SequenceHead, LlamaForCausalLM):
    """Llama-family trunk + `score` (hidden -> num_labels, no bias) at the last real token."""

    hf_suffix = "ForSequenceClassification"
    head_param_prefixes = ("score.",)
    _ignored_hf = LlamaForCausalLM._ignored_hf + (r"^lm_head\.",)  # when starting from a causal LM

    def __init__(self, config, head: TaskHead | None = None):
        super().__init__(config)
        self.lm_head = None
        self.head = head or TaskHead()
        self.score = _init_linear(nn.Linear(config.hidden_size, self.head.num_labels, bias=False),
                                  config.initializer_range)

    @classmethod
    def _from_hf(cls, name, tensor, raw, config):
        if name == "lm_head.weight":
            return None
        return super()._from_hf(name, tensor, raw, config)


class GPT2ForSequenceClassification(_SequenceHead, GPT2LMHeadModel):
    """GPT-2 trunk + `score` (n_embd -> num_labels, no bias) at the last real token."""

    hf_suffix = "ForSequenceClassification"
    head_param_prefixes = ("score.",)

    def __init__(self, config, head: TaskHead | None = None):
        super().__init__(config)
        self.head = head or TaskHead()
        self.score = _init_linear(nn.Linear(config.n_embd, self.head.num_labels, bias=False),
                                  config.initializer_range)

    @classmethod
    def _from_hf(cls, name, tensor, raw, config):
        if name.startswith("score."):
            return name, tensor
        return super()._from_hf(name, tensor, raw, config)


class BertPooler(nn.Module):
    """tanh(dense(hidden of [CLS])), as BERT's pre-training pooler."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first: Tensor) -> Tensor:
        return torch.tanh(self.dense(first))


class _BertHead(BertForMaskedLM):
    """BERT encoder without the MLM head."""

    _ignored_hf = (r"^cls\.", r"embeddings\.position_ids$")

    def __init__(self, config, head: TaskHead | None):
        super().__init__(config)
        self.cls = None
        self.head = head or TaskHead(problem_type="single_label_classification", pooling="cls")
        self.classifier = _init_linear(nn.Linear(config.hidden_size, self.head.num_labels),
                                       config.initializer_range)

    @property
    def mlm_head(self):
        raise AttributeError(f"{type(self).__name__} has no MLM head")  # so hasattr(model, "mlm_head") is False

    def mlm_loss(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} has no MLM head: use loss()")


class BertForSequenceClassification(_SequenceHead, _BertHead):
    """BERT encoder + pooler on [CLS] (or a masked mean) + `classifier`."""

    hf_suffix = "ForSequenceClassification"
    head_param_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config, head: TaskHead | None = None):
        super().__init__(config, head)
        self.bert.pooler = _init_linear_module(BertPooler(config), config.initializer_range)

    def _pooled(self, input_ids, attention_mask, cu_seqlens, kwargs) -> Tensor:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: BERT heads take padded batches (attention_mask), not packed ones")
        hidden = self(input_ids, attention_mask=attention_mask, **kwargs)  # (B, T, H)
        if self.head.pooling == "mean":
            mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(hidden.dtype)
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.bert.pooler(hidden[:, 0])

    def score(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class BertForTokenClassification(_BertHead):
    """BERT encoder + `classifier` on every token (named-entity tags)."""

    hf_suffix = "ForTokenClassification"
    head_param_prefixes = ("classifier.",)
    _ignored_hf = _BertHead._ignored_hf + (r"^bert\.pooler\.",)

    def __init__(self, config, head: TaskHead | None = None):
        super().__init__(config, head or TaskHead(problem_type="single_label_classification", pooling="cls"))

    def token_logits(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """(B, T, num_labels) float32 tag logits."""
        return self.classifier(self(input_ids, attention_mask=attention_mask, **kwargs)).float()

    def loss(self, input_ids: Tensor, labels: Tensor, *, reduction: str = "mean", label_smoothing: float = 0.0,
             **kwargs) -> Tensor:
        """Per-token cross-entropy against (B, T) tags (IGNORE_INDEX on sub-word continuations and
        padding)."""
        return token_classification_loss(self.token_logits(input_ids, **kwargs), labels,
                                         label_smoothing=label_smoothing, reduction=reduction)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, **kwargs) -> Tensor:
        """(B, T) tag ids."""
        return self.token_logits(input_ids, **kwargs).argmax(-1)

    def hf_config_extra(self) -> dict:
        d = self.head.to_hf()
        d["architectures"] = ["BertForTokenClassification"]
        return d


def _init_linear_module(module: nn.Module, std: float) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _init_linear(m, std)
    return module


HEAD_KINDS = ("sequence_classification", "token_classification")


def build_head_model(config, kind: str = "sequence_classification", head: TaskHead | None = None):
    """A randomly initialised head model of `kind` on the trunk that `config` describes."""
    from . import registry

    return registry.head_class(config.model_type, kind)(config, head)


__all__ = [
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "GPT2ForSequenceClassification",
    "HEAD_KINDS",
    "LlamaForSequenceClassification",
    "TaskHead",
    "build_head_model",
    "last_token_index",
]
