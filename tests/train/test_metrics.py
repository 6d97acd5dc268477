"""The task metrics against hand-worked examples and closed forms."""

from __future__ import annotations

import math
import random

import pytest

from fastllm.train.metrics import (
    accuracy,
    bio_spans,
    classification_metrics,
    entity_metrics,
    macro_f1,
    pearson,
    regression_metrics,
)


def test_classification_hand_worked():
    gold, pred = [0, 0, 1, 2], [0, 1, 1, 1]
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 2, fn 0 -> 1/2; class 2: tp 0, fn 1 -> 0
    assert accuracy(pred, gold) == 0.5
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert classification_metrics(gold, gold) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_regression_closed_forms():
    rng = random.Random(0)
    x = [rng.gauss(0, 1) for _ in range(50)]
    y = [2 * v + 1 for v in x]
    assert pearson(x, y) == pytest.approx(1.0)
    assert pearson(x, [-v for v in y]) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, [3.0] * 50))
    m = regression_metrics([1.0, 2.0, 4.0], [1.0, 0.0, 5.0])
    assert m["mse"] == pytest.approx((0 + 4 + 1) / 3) and m["mae"] == pytest.approx((0 + 2 + 1) / 3)


def test_bio_spans_follow_conlleval():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    # I- without an open span of its type starts one; B- after B- starts a new one
    assert bio_spans(["I-ORG", "I-ORG", "B-ORG", "I-LOC"]) == {("ORG", 0, 2), ("ORG", 2, 3), ("LOC", 3, 4)}
    assert bio_spans(["O", "O"]) == set()


def test_entity_metrics_hand_worked():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"], ["O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "I-ORG", "I-ORG"], ["O", "O"]]
    # gold spans: PER 0-2, LOC 3-4, ORG 5-7 | PER 1-2   (4)
    # pred spans: PER 0-2, ORG 3-4, ORG 5-7 (I-ORG after O opens a span)   (3); correct: PER 0-2, ORG 5-7
    m = entity_metrics(pred, gold)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # 4/7
    # a boundary off by one is a miss
    assert entity_metrics([["B-PER", "O"]], [["B-PER", "I-PER"]])["f1"] == 0.0


def test_metric_inputs_checked():
    with pytest.raises(ValueError, match="3 values but 2"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"pred_tags\[0\]"):
        entity_metrics([["O"]], [["O", "O"]])
