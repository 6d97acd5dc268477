"""Evaluation metrics of the task heads, on plain Python lists (small, exact, no extra package).

    classification_metrics(pred, gold, num_labels) -> {"accuracy", "macro_f1"}
    regression_metrics(pred, gold)                 -> {"mse", "mae", "pearson"}
    entity_metrics(pred_tags, gold_tags)           -> {"precision", "recall", "f1"} over BIO spans

Macro-F1 averages the per-class F1 over the classes that occur in the gold or the predicted
labels (scikit-learn's convention); a class never predicted and never present is left out.
Entities follow CoNLL's conlleval: a span starts at B-X, or at I-X that does not continue an
open X span, and runs over the following I-X; a predicted entity counts only when its type,
start and end all match a gold one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    _same_length(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else float("nan")


def macro_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    _same_length(pred, gold)
    classes = sorted(set(pred) | set(gold))
    if not classes:
        return float("nan")
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def classification_metrics(pred: Sequence[int], gold: Sequence[int]) -> dict:
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant (or fewer than 2 values)."""
    _same_length(x, y)
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def regression_metrics(pred: Sequence[float], gold: Sequence[float]) -> dict:
    _same_length(pred, gold)
    n = len(gold)
    if n == 0:
        return {"mse": float("nan"), "mae": float("nan"), "pearson": float("nan")}
    return {"mse": sum((p - g) ** 2 for p, g in zip(pred, gold)) / n,
            "mae": sum(abs(p - g) for p, g in zip(pred, gold)) / n,
            "pearson": pearson(pred, gold)}


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities of one BIO-tagged sequence as (type, start, end) with end exclusive.
    "O" (or any tag without a B-/I- prefix) closes an open span."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-") if tag[:2] in ("B-", "I-") else ("O", "", "")
        continues = prefix == "I" and kind == t
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = t, i
    return spans


def entity_metrics(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 of exact-match entities over sequences of BIO tags."""
    _same_length(pred_tags, gold_tags)
    tp = n_pred = n_gold = 0
    for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"pred_tags[{i}]: {len(p)} tags but gold_tags[{i}] has {len(g)}")
        ps, gs = bio_spans(p), bio_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions: {len(a)} values but {len(b)} gold values; expected the same number")


__all__ = ["accuracy", "bio_spans", "classification_metrics", "entity_metrics", "macro_f1", "pearson",
           "regression_metrics"]
