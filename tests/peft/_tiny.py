"""Shared pieces of the PEFT tests: a tiny Llama, a small learnable task, a training loop."""

from __future__ import annotations

import torch

from fastllm import peft
from fastllm.labels import next_token_labels
from fastllm.models import build_model, preset


def tiny_llama(**overrides):
    """The tiny-llama preset with weights of std 0.3: a frozen base initialised at the usual
    0.02 cannot produce confident logits through its frozen embeddings and final norm."""
    torch.manual_seed(0)
    overrides.setdefault("initializer_range", 0.3)
    return build_model(preset("tiny-llama", **overrides))


def successor_task(vocab: int, batch: int = 16, length: int = 12, seed: int = 1):
    """Counting sequences (start, start+1, ...) mod vocab: each next token is the current one
    plus one, a token-to-token map that the MLP and attention projections can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    ids = (start + torch.arange(length)) % vocab
    return ids, next_token_labels(ids)


def constant_task(vocab: int, batch: int = 8, length: int = 10, target: int = 7, seed: int = 1):
    """Random inputs whose every next token is `target`: a behaviour a soft prompt or a
    key/value prefix can steer the model to."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    ids[:, 1:] = target
    return ids, next_token_labels(ids)


def train(model, loss_fn, steps: int = 60, lr: float = 1e-2) -> tuple[float, float]:
    """AdamW on the adapter parameters only; returns (first loss, last loss)."""
    params = peft.adapter_parameters(model)
    assert params, "no adapter parameters to train"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    first = last = None
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def grads_only_on_adapters(model, loss) -> None:
    """Backward `loss`; every adapter parameter gets a non-zero gradient, nothing else any."""
    loss.backward()
    adapters = peft.adapter_parameter_names(model)
    assert adapters
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapters)
