"""Pieces every training loop shares, as plain functions: device and autocast choice,
seeding, AdamW and the learning-rate schedules, freezing, activation checkpointing, the
token-normalised losses, one optimizer step over a list of micro-batches, and evaluation.

Gradient accumulation (see `optimizer_step`): a step sees micro-batches m = 1..M on every
rank; with n_m counted target tokens in micro-batch m and N = sum over all micro-batches of
all ranks, the loss that is differentiated is

    L = sum_m sum_{t in m} ce_t / N

so a step weighs every real token equally however the tokens fall into micro-batches or
ranks (the mean of per-micro-batch means would over-weigh short micro-batches).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import random
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from fastllm.labels import IGNORE_INDEX

# --------------------------------------------------------------------------- device, dtype, seed

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bfloat16 on GPU and float32 on CPU for "auto"."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op context for float32 (weights stay float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a step may draw from, as JSON-able lists (restored on resume so dropout and
    sampling repeat)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------- optimizer and schedule

def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices (dim >= 2) decay, biases, norms and
    other vectors do not. torch's fused AdamW on the CPU and CUDA (one kernel over every
    parameter: 7x faster than the default multi-tensor step for SmolLM2's 135M parameters on the
    CPU; Hugging Face's Trainer defaults to it too on torch >= 2.8), the default elsewhere."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters (everything is frozen)")
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = params[0][1].device.type in ("cpu", "cuda") and all(p.is_floating_point() for _, p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_lambda(step: int, *, warmup_steps: int, max_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warm-up from 1/(warmup+1) to 1
    over warmup_steps, then cosine or linear decay to min_lr_ratio at max_steps (or constant)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    raise ValueError(f"schedule: expected cosine, linear or constant, got {schedule!r}")


def build_scheduler(optimizer, *, warmup_steps: int, max_steps: int, schedule: str = "cosine",
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    lr_lambda(0, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule)  # validates schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule, min_lr_ratio=min_lr_ratio))


def optimizer_for(model: nn.Module, cfg, updates_per_step: int = 1):
    """AdamW and the learning-rate schedule a training config asks for (lr, weight_decay, betas,
    eps, warmup_steps, max_steps, schedule, min_lr_ratio). updates_per_step: optimizer steps per
    loop step (PPO / GRPO: epochs x minibatches per iteration), so warm-up and decay count
    optimizer steps. Returns (optimizer, scheduler)."""
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps * updates_per_step,
                                max_steps=cfg.max_steps * updates_per_step, schedule=cfg.schedule,
                                min_lr_ratio=cfg.min_lr_ratio)
    return optimizer, scheduler


# --------------------------------------------------------------------------- freezing, checkpointing

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")


def freeze_parameters(model: nn.Module, patterns: Iterable[str] = (), train_layers: str | None = None) -> int:
    """Freeze parameters whose name matches a glob in `patterns`; with train_layers "a:b",
    also freeze every parameter outside decoder layers a..b-1. Returns the number of
    trainable parameters left (a ValueError when none)."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"freeze: pattern {pat!r} matches no parameter (names look like {names[0]!r})")
    lo = hi = None
    if train_layers is not None:
        try:
            a, b = str(train_layers).split(":")
            n_layers = 1 + max(int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n)))
            lo = int(a) if a else 0
            hi = int(b) if b else n_layers
            lo, hi = (lo + n_layers if lo < 0 else lo), (hi + n_layers if hi < 0 else hi)
        except ValueError as exc:
            raise ValueError(f"train_layers: expected 'a:b' (decoder layer range), got {train_layers!r}") from exc
        if not 0 <= lo < hi <= n_layers:
            raise ValueError(f"train_layers: expected a non-empty range inside [0, {n_layers}), got {train_layers!r}")
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
        if lo is not None:
            m = _LAYER_INDEX.search(name)
            if m is None or not lo <= int(m.group(1)) < hi:
                p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"freeze: no trainable parameter left (freeze={list(patterns)}, "
                         f"train_layers={train_layers!r})")
    return n


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (Llama `model.layers`, GPT-2 `transformer.h`, BERT
    `bert.encoder.layer`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "layer"):
            return module
    raise ValueError(f"model: found no transformer layer stack in {type(model).__name__}")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its
    activations: switches on the `activation_checkpointing` flag of the fastllm model inside
    `model` (a PEFT wrapper included), whose forward then runs every block under
    torch.utils.checkpoint. Parameter names and the state dict do not change."""
    found = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no activation_checkpointing switch "
                         "(expected a fastllm model)")
    for m in found:
        m.activation_checkpointing = True


# --------------------------------------------------------------------------- losses

class CausalLMLoss(nn.Module):
    """model + its next-token loss in one forward, so DDP and FSDP see the head's weight used
    inside forward. forward(batch) -> summed cross-entropy over the labelled tokens (labels
    already shifted, as fastllm.data makes them; see fastllm.labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None, cu_seqlens=None, max_seqlen=None,
                attention_mask=None) -> Tensor:
        if cu_seqlens is not None and input_ids.dim() == 2 and input_ids.shape[0] > 1:
            # (B, T) blocks with cu_seqlens over the B*T flattened tokens -> one packed row (1, B*T)
            input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)
            position_ids = position_ids.reshape(1, -1) if position_ids is not None else None
        return self.model.loss(input_ids, labels, reduction="sum", position_ids=position_ids,
                               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, attention_mask=attention_mask)


class MaskedLMLoss(nn.Module):
    """An encoder + its MLM loss: summed cross-entropy at the masked positions (no shift)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, **_) -> Tensor:
        return self.model.mlm_loss(input_ids, labels, attention_mask=attention_mask, reduction="sum")


def count_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- the step

def _nothing_counted(count_fn: Callable[[dict], int]) -> str:
    if count_fn is count_tokens:
        return "batch: no labelled tokens in this step (every label is -100)"
    name = getattr(count_fn, "__name__", repr(count_fn))
    return f"batch: count_fn {name} counted 0 over every micro-batch of every rank in this step; expected > 0"


def optimizer_step(micro_batches: list[dict], loss_sum_fn: Callable[[dict], Tensor], model: nn.Module, optimizer,
                   scheduler, *, device: torch.device, dtype: torch.dtype, max_grad_norm: float | None,
                   world_size: int = 1, no_sync: Callable | None = None,
                   count_fn: Callable[[dict], int] = count_tokens) -> dict:
    """One optimizer step over micro-batches (gradient accumulation).

    loss_sum_fn(batch) -> the summed loss over what count_fn(batch) counts in the batch (a
    closure, so reward, DPO or PPO losses reuse this step). count_fn says what the loss is
    normalised by: labelled tokens (labels != -100) by default, pairs for a reward or DPO
    loss, response tokens for PPO. Each micro-batch's sum is divided by the global count N
    (all ranks, all micro-batches); DDP and FSDP average gradients over ranks, so the loss is
    also multiplied by world_size. Returns {"loss", "tokens", "grad_norm", "lr"} with loss =
    global sum / N and tokens = N. A non-finite loss raises FloatingPointError before the
    optimizer touches the weights.
    """
    counts = torch.tensor([count_fn(b) for b in micro_batches], dtype=torch.float64)
    total = counts.sum().to(device)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    n_tokens = float(total)
    if n_tokens == 0:
        raise ValueError(_nothing_counted(count_fn))
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast(device, dtype):
                loss_sum = loss_sum_fn(to_device(batch, device))
            (loss_sum.float() * (world_size / n_tokens)).backward()
        loss_acc += loss_sum.detach().double()
    if world_size > 1:
        torch.distributed.all_reduce(loss_acc)
    loss = float(loss_acc) / n_tokens
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss: non-finite value {loss} at learning rate {scheduler.get_last_lr()[0]:.3g}")
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "tokens": int(n_tokens), "grad_norm": grad_norm, "lr": lr}


@torch.no_grad()
def evaluate(loss_sum_fn: Callable[[dict], Tensor], batches: Iterable[dict], *, device: torch.device,
             dtype: torch.dtype, world_size: int = 1, count_fn: Callable[[dict], int] = count_tokens) -> dict:
    """Mean loss (summed loss / what count_fn counts: labelled tokens by default) and
    perplexity = exp(loss) over `batches`, all ranks pooled."""
    acc = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for batch in batches:
        with autocast(device, dtype):
            acc[0] += loss_sum_fn(to_device(batch, device)).double()
        acc[1] += count_fn(batch)
    if world_size > 1:
        torch.distributed.all_reduce(acc)
    if float(acc[1]) == 0:
        return {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 0}
    loss = float(acc[0] / acc[1])
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(acc[1])}
