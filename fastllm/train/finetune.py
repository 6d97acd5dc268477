"""Task fine-tuning: text classification (cross-entropy), regression (mean squared error) and
token classification (named entities, per-token cross-entropy) with a small head on a trunk.

    from fastllm.train import FinetuneConfig, finetune
    finetune(FinetuneConfig(task="classification", data="topics", model="runs/pretrain/final"))
    finetune(FinetuneConfig(task="regression", data="ratings.csv", columns={"text": "review", "label": "stars"}))
    finetune(FinetuneConfig(task="token_classification", data="entities", model="tiny-bert",
                            peft={"method": "lora", "r": 8, "target_modules": ["query", "value"]}))

The model is a preset with a fresh head, a checkpoint that already carries this head (training
continues), or a new head on a checkpoint's trunk (a causal LM or an MLM encoder). Decoders
read the head at the last real token (never a pad), BERT at [CLS] through the pooler or as a
masked mean (pooling). The full model, selected layers (train_layers, freeze) or a PEFT
method is trained; the head always stays trainable, and with PEFT it is saved with the
adapter (PEFT's modules_to_save).

Data: CSV / JSONL / JSON with a column mapping, or a shipped set (fastllm.data.load_task_data;
every record is checked before training, errors name the record and the field). Label names
end up in config.json (id2label / label2id). Token classification encodes the words one by
one: the first sub-token of a word carries its tag, continuations and padding IGNORE_INDEX.

The step is the shared supervised step: the loss closure returns the *sum* over the batch
(cross-entropy, weighted by class_weights; squared error, on standardised targets when
standardize is set; per-tagged-word cross-entropy) and count_fn counts sequences (tagged words
for token classification), so micro-batch and rank splits leave the loss unchanged.
Evaluation on the held-out share: loss plus accuracy and macro-F1 (classification), MSE, MAE
and Pearson r on the original scale (regression), entity-level precision / recall / F1 over
BIO spans and tag accuracy (token classification).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastllm.data import BatchLoader, TaskDataset, load_task_data, train_test_split
from fastllm.labels import IGNORE_INDEX
from fastllm.models.heads import TaskHead

from . import build
from .checkpoint import resume_training_state, save_training_state
from .common import (
    autocast,
    count_tokens,
    enable_activation_checkpointing,
    evaluate,
    freeze_parameters,
    optimizer_for,
    to_device,
    transformer_layers,
)
from .config import FinetuneConfig, as_config
from .distributed import DistInfo, wrap_model
from .export import export_final
from .loop import start_run, supervised_step, train_loop
from .metrics import classification_metrics, entity_metrics, regression_metrics
from .peft_glue import apply_peft

HEAD_KIND = {"classification": "sequence_classification", "regression": "sequence_classification",
             "token_classification": "token_classification"}
PEFT_TASK_TYPE = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


class TaskLoss(nn.Module):
    """model + its task loss in one forward (so DDP and FSDP see the head used inside forward).

    forward(input_ids, attention_mask, labels) -> the summed loss of the batch;
    forward(..., predict=True) -> predictions (class ids (B,), values (B,) on the original
    scale, or tag ids (B, T))."""

    def __init__(self, model: nn.Module, task: str, class_weights: Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.task, self.label_smoothing = model, task, label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, input_ids, attention_mask, labels=None, predict: bool = False) -> Tensor:
        if predict:
            return self.model.predict(input_ids, attention_mask=attention_mask)
        if self.task == "regression":
            return self.model.loss(input_ids, labels, attention_mask=attention_mask, reduction="sum")
        if self.task == "token_classification":
            return self.model.loss(input_ids, labels, attention_mask=attention_mask, reduction="sum",
                                   label_smoothing=self.label_smoothing)
        return self.model.loss(input_ids, labels, attention_mask=attention_mask, reduction="sum",
                               class_weights=self.class_weights, label_smoothing=self.label_smoothing)


def count_sequences(batch: dict) -> int:
    return int(batch["labels"].shape[0])


def head_modules(model: nn.Module) -> list[str]:
    """Names of the head's modules (score; classifier and BERT's pooler), as in PEFT's modules_to_save."""
    return [p.rstrip(".") for p in model.head_param_prefixes]


def _trunk_type(cfg: FinetuneConfig) -> str:
    import os

    from fastllm import models
    from fastllm.models.checkpoint import read_config

    if os.path.isdir(cfg.model):
        return read_config(cfg.model).get("model_type", "")
    return models.preset(cfg.model).model_type if cfg.model in models.PRESETS else ""


def _make_head(cfg: FinetuneConfig, data, train_records: list[dict], pad_id: int | None) -> TaskHead:
    bert = _trunk_type(cfg) == "bert"
    pooling = cfg.pooling or ("cls" if bert else "last")
    if bert and pooling == "last":
        raise ValueError("pooling: a BERT head reads [CLS] (cls) or a masked mean (mean), not last")
    if not bert and pooling != "last":
        raise ValueError(f"pooling: decoders read the last real token (last), got {pooling!r}")
    if cfg.task == "regression":
        mean = std = None
        if cfg.standardize:
            ys = [r["label"] for r in train_records]
            mean = sum(ys) / len(ys)
            std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys)) or 1.0
        return TaskHead(num_labels=1, problem_type="regression", pooling=pooling, output_scale=std,
                        output_shift=mean, pad_token_id=pad_id)
    if data.label_names is not None:
        num_labels = len(data.label_names)
    else:
        ids = [t for r in data.records for t in (r["tags"] if "tags" in r else [r["label"]])]
        num_labels = cfg.num_labels or max(ids) + 1
    id2label = dict(enumerate(data.label_names)) if data.label_names else None
    return TaskHead(num_labels=num_labels, problem_type="single_label_classification", id2label=id2label,
                    pooling=pooling, pad_token_id=pad_id)


def _class_weights(cfg: FinetuneConfig, num_labels: int) -> Tensor | None:
    if cfg.class_weights is None:
        return None
    if cfg.task != "classification":
        raise ValueError(f"class_weights: only for task=classification, got task={cfg.task!r}")
    if len(cfg.class_weights) != num_labels:
        raise ValueError(f"class_weights: expected {num_labels} weights (one per class), got "
                         f"{len(cfg.class_weights)}")
    if any(not w >= 0 for w in cfg.class_weights):
        raise ValueError(f"class_weights: expected non-negative weights, got {cfg.class_weights}")
    return torch.tensor(cfg.class_weights, dtype=torch.float32)


def _keep_head_trainable(model: nn.Module, freeze: list[str]) -> None:
    import fnmatch

    for name, p in model.named_parameters():
        if name.startswith(tuple(model.head_param_prefixes)) and not any(fnmatch.fnmatchcase(name, g) for g in freeze):
            p.requires_grad_(True)


def _metrics(task: str, preds: list, golds: list, label_names: list[str] | None) -> dict:
    if task == "classification":
        return classification_metrics(preds, golds)
    if task == "regression":
        return regression_metrics(preds, golds)
    names = label_names or []

    def name(i):
        return names[i] if i < len(names) else "O"
    pred_tags = [[name(i) for i in row] for row in preds]
    gold_tags = [[name(i) for i in row] for row in golds]
    out = entity_metrics(pred_tags, gold_tags)
    n = sum(len(row) for row in golds)
    out["tag_accuracy"] = sum(p == g for pr, gr in zip(preds, golds) for p, g in zip(pr, gr)) / max(n, 1)
    return out


def _predictions(task: str, pred: Tensor, labels: Tensor) -> tuple[list, list]:
    if task != "token_classification":
        return pred.float().tolist() if task == "regression" else pred.tolist(), labels.tolist()
    keep = labels != IGNORE_INDEX
    return ([p[k].tolist() for p, k in zip(pred, keep)], [g[k].tolist() for g, k in zip(labels, keep)])


def _gather(values: list, info: DistInfo) -> list:
    if info.world_size == 1:
        return values
    parts = [None] * info.world_size
    torch.distributed.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def finetune(config: FinetuneConfig | str | dict | None = None, *, model=None, tokenizer=None) -> dict:
    """Run task fine-tuning; returns {"step", "loss", "eval_loss", "eval_accuracy" / "eval_mse" /
    "eval_f1", ..., "trainable_params", "label_names"}.

    config: a FinetuneConfig, a YAML path or a dict of fields. model / tokenizer: ready objects
    instead of what the config names (model: a head model of the task's kind)."""
    cfg = as_config(FinetuneConfig, config)
    kind = HEAD_KIND[cfg.task]
    # ---- setup: data (checked before anything else), devices, tokenizer, model
    data = load_task_data(cfg.data, cfg.task, columns=cfg.columns, labels=cfg.labels, num_labels=cfg.num_labels)
    info, device, dtype, out = start_run(cfg)
    indices, held = list(range(len(data.records))), []
    if cfg.eval_batches > 0 and cfg.eval_fraction > 0 and len(indices) >= 2:
        indices, held = train_test_split(indices, cfg.eval_fraction, seed=cfg.seed)
    if tokenizer is None:
        tokenizer = build.get_tokenizer(cfg, info, lambda: build.task_texts(data.records))
    head = _make_head(cfg, data, [data.records[i] for i in indices], tokenizer.pad_id)
    class_weights = _class_weights(cfg, head.num_labels)
    if model is None:
        model = build.get_head_model(cfg, kind, head, tokenizer.vocab_size, cfg.max_length)

    def dataset(idx):
        return TaskDataset([data.records[i] for i in idx], tokenizer, cfg.task, cfg.max_length,
                           wheres=[data.wheres[i] for i in idx])
    train_set, eval_set = dataset(indices), (dataset(held) if held else None)
    loader = BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loader.collate_fn = train_set.collate
    eval_data = build.eval_batches(eval_set, cfg.batch_size, cfg.eval_batches, info, train_set.collate)

    if cfg.peft:
        peft_model = apply_peft(model, cfg.peft)
        if peft_model is not model:
            raise ValueError(f"peft.method: {cfg.peft.get('method', 'lora')} wraps the model's forward; task heads "
                             "take the in-place methods (lora, adapters)")
    n_trainable = freeze_parameters(model, cfg.freeze, cfg.train_layers)
    _keep_head_trainable(model, cfg.freeze)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = wrap_model(TaskLoss(model, cfg.task, class_weights, cfg.label_smoothing), info,
                         transformer_layers(model), device)
    optimizer, scheduler = optimizer_for(wrapped, cfg)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    adapters_only = bool(cfg.peft)
    count_fn = count_tokens if cfg.task == "token_classification" else count_sequences

    def loss_sum(batch: dict) -> Tensor:
        return wrapped(**batch)

    def run_eval() -> dict:
        wrapped.eval()
        try:
            res = evaluate(loss_sum, eval_data, device=device, dtype=dtype, world_size=info.world_size,
                           count_fn=count_fn)
            preds, golds = [], []
            with torch.no_grad():
                for batch in eval_data:
                    b = to_device(batch, device)
                    with autocast(device, dtype):
                        pred = wrapped(b["input_ids"], b["attention_mask"], predict=True)
                    p, g = _predictions(cfg.task, pred.cpu(), batch["labels"])
                    preds += p
                    golds += g
        finally:
            wrapped.train()
        metrics = {"eval_loss": res["eval_loss"]}
        scores = _metrics(cfg.task, _gather(preds, info), _gather(golds, info), data.label_names)
        metrics.update({f"eval_{k}": v for k, v in scores.items()})
        return metrics

    def save(step: int):
        return save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info,
                                   trainable_only=adapters_only)

    # ---- train (fastllm.train.loop: steps, eval, logging, checkpoints, final eval + checkpoint + plot)
    step_fn = supervised_step(loader, loss_sum, wrapped, optimizer, scheduler, cfg, info, device=device,
                              dtype=dtype, count_fn=count_fn)
    wrapped.train()
    result = train_loop(cfg, info, step, step_fn, save=save, evaluate=run_eval if eval_data else None)

    # ---- finish: the model with its head (transformers layout), or the adapter + head
    final = out / "final"
    if adapters_only:
        from fastllm.peft import save_adapter

        if info.mode == "fsdp":
            raise NotImplementedError("distributed: saving adapters from an FSDP run is not supported; use ddp")
        if info.is_main:
            save_adapter(model, final, modules_to_save=head_modules(model), task_type=PEFT_TASK_TYPE[kind])
            tokenizer.save(final)
        info.barrier()
    else:
        export_final(model, wrapped, tokenizer, final, info)
    result["trainable_params"] = n_trainable
    result["label_names"] = data.label_names
    return result
