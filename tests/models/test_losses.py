"""The models' loss entries against plain PyTorch on their own logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.models import build_model, preset
from tests.conftest import assert_close


def test_bert_mlm_loss_equals_cross_entropy_of_the_head_logits():
    torch.manual_seed(0)
    model = build_model(preset("tiny-bert"))
    V = model.config.vocab_size
    ids = torch.randint(5, V, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = ids[0, [1, 4]]
    labels[1, 9] = 3
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    loss = model.mlm_loss(ids, labels, attention_mask=mask)
    logits = model.mlm_head(model(ids, attention_mask=mask))  # (B, T, V)
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert_close(loss, expected)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True):
        assert_close(g, r)
    assert_close(model.mlm_loss(ids, labels, attention_mask=mask, reduction="sum"), expected * 3)


def test_bert_mlm_loss_all_ignored_is_zero():
    model = build_model(preset("tiny-bert"))
    ids = torch.randint(5, model.config.vocab_size, (2, 6))
    loss = model.mlm_loss(ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0


def test_bert_mlm_loss_rejects_labels_outside_the_vocabulary():
    import pytest

    model = build_model(preset("tiny-bert"))
    ids = torch.randint(5, model.config.vocab_size, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 1] = model.config.vocab_size + 7
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 128\) or ignore_index -100, got 135"):
        model.mlm_loss(ids, labels)
