import math
import random

import numpy as np
import pytest
import torch

from fastllm import models
from fastllm.train.common import (
    CausalLMLoss,
    build_optimizer,
    build_scheduler,
    enable_activation_checkpointing,
    freeze_parameters,
    lr_lambda,
    optimizer_step,
    rng_state,
    set_rng_state,
)


def test_schedules():
    kw = dict(warmup_steps=4, max_steps=24, min_lr_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(1 / 5)
    assert lr_lambda(3, **kw) == pytest.approx(4 / 5)
    assert lr_lambda(4, **kw) == pytest.approx(1.0)
    assert lr_lambda(14, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(14, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(24, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_lambda(30, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_lambda(20, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="schedule: expected cosine"):
        lr_lambda(10, schedule="exp", **kw)


def _model(seed=0):
    torch.manual_seed(seed)
    return models.build_model(models.preset("tiny-llama"))


def _batch(g, B, T, n_ignore):
    ids = torch.randint(0, 128, (B, T), generator=g)
    labels = torch.randint(0, 128, (B, T), generator=g)
    labels[:, :n_ignore] = -100
    return {"input_ids": ids, "labels": labels}


def _step(model, micro, **kw):
    module = CausalLMLoss(model)
    # SGD with lr 1: the weight change is exactly the gradient (AdamW's first step is ~sign(g))
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    sched = build_scheduler(opt, warmup_steps=0, max_steps=10, schedule="constant")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_sum(b):
        return module(**b)

    out = optimizer_step(micro, loss_sum, module, opt, sched, device=torch.device("cpu"), dtype=torch.float32,
                         max_grad_norm=None, **kw)
    return out, {n: start[n] - p.detach() for n, p in model.named_parameters()}, None


def test_grad_accumulation_weighs_every_token_equally():
    """Two micro-batches with different real-token counts give the same update as one
    batch holding both (the mean over all tokens, not the mean of the two means)."""
    g = torch.Generator().manual_seed(0)
    a, b = _batch(g, 2, 12, 2), _batch(g, 2, 12, 9)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    out1, w1, _ = _step(_model(), [a, b])
    out2, w2, _ = _step(_model(), [both])
    assert out1["tokens"] == out2["tokens"] == int((both["labels"] != -100).sum())
    assert out1["loss"] == pytest.approx(out2["loss"], rel=1e-6)
    assert out1["grad_norm"] == pytest.approx(out2["grad_norm"], rel=1e-5)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], rtol=1e-5, atol=1e-7)
    # the mean of the two micro-batch means would give a different gradient
    na, nb = (int((x["labels"] != -100).sum()) for x in (a, b))
    assert na != nb


def test_count_fn_sets_what_the_step_normalises_by():
    """count_fn counting rows (as a reward loss counts pairs): the step's loss and update are
    those of (summed loss over both micro-batches) / rows."""
    g = torch.Generator().manual_seed(3)
    a, b = _batch(g, 2, 12, 2), _batch(g, 3, 12, 5)

    def rows(batch):
        return batch["input_ids"].shape[0]

    model = _model()
    ref = (CausalLMLoss(model)(**a) + CausalLMLoss(model)(**b)) / 5
    ref.backward()
    out, w, _ = _step(_model(), [a, b], count_fn=rows)
    assert out["tokens"] == 5
    assert out["loss"] == pytest.approx(float(ref.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(w[n], p.grad, rtol=1e-5, atol=1e-7)

    def pairs(batch):
        return 0

    with pytest.raises(ValueError, match="batch: count_fn pairs counted 0 over every micro-batch"):
        _step(_model(), [a], count_fn=pairs)


def test_clipping_and_nonfinite():
    model = _model()
    module = CausalLMLoss(model)
    opt = build_optimizer(module, lr=1e-2, weight_decay=0.0)
    sched = build_scheduler(opt, warmup_steps=0, max_steps=10)
    batch = _batch(torch.Generator().manual_seed(1), 2, 8, 0)
    out = optimizer_step([batch], lambda b: module(**b), module, opt, sched, device=torch.device("cpu"),
                         dtype=torch.float32, max_grad_norm=1e-3)
    assert out["grad_norm"] > 1e-3  # the norm before clipping is reported
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="loss: non-finite"):
        optimizer_step([batch], lambda b: module(**b) * float("nan"), module, opt, sched,
                       device=torch.device("cpu"), dtype=torch.float32, max_grad_norm=1.0)
    for n, p in model.named_parameters():  # weights untouched by the bad step
        assert torch.equal(before[n], p)


def test_freeze_patterns_and_layer_range():
    model = models.build_model(models.preset("tiny-llama", num_hidden_layers=4))
    n = freeze_parameters(model, ["model.embed_tokens.*"], train_layers="1:3")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.layers.1.", "model.layers.2.")) for name in trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="freeze: pattern 'nope.*' matches no parameter"):
        freeze_parameters(model, ["nope.*"])
    with pytest.raises(ValueError, match="train_layers: expected a non-empty range"):
        freeze_parameters(model, [], train_layers="3:9")
    with pytest.raises(ValueError, match="no trainable parameter left"):
        freeze_parameters(model, ["*"])


def test_activation_checkpointing_same_gradients():
    g = torch.Generator().manual_seed(2)
    batch = _batch(g, 2, 16, 3)
    grads = []
    for ckpt in (False, True):
        model = _model()
        if ckpt:
            enable_activation_checkpointing(model)
        CausalLMLoss(model)(**batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_rng_state_roundtrip():
    import json

    state = json.loads(json.dumps(rng_state()))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert math.isfinite(draws[0])
