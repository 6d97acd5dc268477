"""The loss entries of the task heads (sequence classification, regression, token
classification), one per objective, on the fused cross-entropy kernels. Labels follow
fastllm.labels: one label per sequence (classification, regression) or per token (token
classification, IGNORE_INDEX on sub-word continuations and padding).

    classification_loss(logits (B, C), labels (B,), class_weights=None, label_smoothing=0)
        = sum_b w[y_b] * CE_b / sum_b w[y_b]       (PyTorch's weighted mean; w = 1 without weights)
    regression_loss(pred (B,) or (B, K), target (same)) = mean squared error
    token_classification_loss(logits (B, T, C), labels (B, T)) = CE over labels != IGNORE_INDEX

reduction "mean" (above), "sum" (the numerator, for a step that divides by a global count)
or "none" (per sequence / per token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastllm.labels import IGNORE_INDEX

from .cross_entropy import cross_entropy


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def classification_loss(logits: Tensor, labels: Tensor, *, class_weights: Tensor | None = None,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (B, C) logits against (B,) class ids in [0, C) (IGNORE_INDEX skips a
    row). class_weights (C,): each row's loss is weighted by its class's weight and "mean"
    divides by the sum of the weights used (as torch.nn.functional.cross_entropy does)."""
    _check_reduction(reduction)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape (B, num_labels), got {list(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels: expected shape [{logits.shape[0]}] (one class per sequence), "
                         f"got {list(labels.shape)}")
    rows = cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none",
                         label_smoothing=label_smoothing)  # (B,), 0 on ignored rows
    valid = labels != IGNORE_INDEX
    if class_weights is not None:
        if class_weights.shape != logits.shape[1:]:
            raise ValueError(f"class_weights: expected shape [{logits.shape[1]}] (one per class), "
                             f"got {list(class_weights.shape)}")
        w = class_weights.to(rows)[torch.where(valid, labels, 0)] * valid
    else:
        w = valid.to(rows.dtype)
    weighted = rows * w
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def regression_loss(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Mean squared error, computed in float32 (float64 for float64). pred and target (B,) or
    (B, K); a NaN target is an error (raised by the data checks before training)."""
    _check_reduction(reduction)
    if pred.shape != target.shape:
        raise ValueError(f"target: expected shape {list(pred.shape)} (as the predictions), got {list(target.shape)}")
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    sq = (pred.to(acc) - target.to(acc)).square()
    if sq.dim() > 1:
        sq = sq.sum(-1) if reduction != "mean" else sq.mean(-1)
    if reduction == "none":
        return sq
    return sq.sum() if reduction == "sum" else sq.mean()


def token_classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                              reduction: str = "mean") -> Tensor:
    """Cross-entropy of per-token logits (..., T, C) against tags (..., T); IGNORE_INDEX marks
    sub-word continuations and padding. "mean" averages over the tagged tokens (0 when none)."""
    _check_reduction(reduction)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {list(logits.shape[:-1])} (one tag per token), "
                         f"got {list(labels.shape)}")
    return cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction=reduction,
                         label_smoothing=label_smoothing)
