"""Training drops the activations it can recompute (fastllm.models._decoder.recompute_saved):
each norm's output and the SwiGLU product are freed after the forward and recomputed in the
backward, with gradients bit for bit those of keeping them; off under activation checkpointing."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fastllm.models import _decoder, build_model, preset
from fastllm.peft import apply_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(lora: bool, checkpointing: bool = False):
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    if lora:
        apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)  # non-zero, so every adapter gradient is exercised
    model.activation_checkpointing = checkpointing
    return model


def _batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=g)
    return ids, torch.roll(ids, -1, 1)


def _loss_and_grads(model):
    ids, labels = _batch(model)
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _keep_everything(value, recompute, consumer, step):
    return consumer(value)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_keeping_the_activations(monkeypatch, lora, checkpointing):
    model = _model(lora, checkpointing)
    loss, grads = _loss_and_grads(model)
    monkeypatch.setattr(_decoder, "recompute_saved", _keep_everything)
    kept_loss, kept = _loss_and_grads(model)
    assert torch.equal(loss, kept_loss)
    assert grads.keys() == kept.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], kept[name]), name


def _inputs_alive_after_forward(model) -> list[bool]:
    """Whether the q_proj and down_proj inputs of layer 0 (a norm's output, the SwiGLU
    product) are still alive after the forward, before the backward."""
    refs = []
    layer = model.model.layers[0]
    hooks = [module.register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(args[0])))
             for module in (layer.self_attn.q_proj, layer.mlp.down_proj)]
    ids, labels = _batch(model)
    loss = model.loss(ids, labels)
    gc.collect()
    alive = [r() is not None for r in refs]
    loss.backward()
    for h in hooks:
        h.remove()
    return alive


@pytest.mark.parametrize("lora", [False, True])
def test_the_activations_are_not_kept(monkeypatch, lora):
    model = _model(lora)
    assert _inputs_alive_after_forward(model) == [False, False]
    monkeypatch.setattr(_decoder, "recompute_saved", _keep_everything)
    kept = _inputs_alive_after_forward(model)  # what autograd keeps otherwise
    # (the LoRA op saves its input tensor itself; F.linear saves a 2-D view of a 3-D input, which
    # keeps the memory but not the Python object the weak reference watches)
    assert kept == [True, True] if lora else kept[1]
    monkeypatch.undo()
    model.recompute_activations = False  # the model's switch
    assert _inputs_alive_after_forward(model) == kept
