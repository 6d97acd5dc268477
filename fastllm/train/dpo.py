"""Direct preference optimisation (DPO), IPO and conservative DPO on (prompt, chosen, rejected) pairs.

    from fastllm.train import DPOConfig, dpo
    dpo(DPOConfig(model="runs/sft/final", beta=0.1, max_steps=200))
    dpo(DPOConfig(model="runs/sft/final", peft={"method": "lora", "r": 8}, reference="live"))

A step: P pairs become one packed row (the P chosen sequences, then the P rejected ones, each
its own varlen segment; fastllm.train.build.pack_pairs), one forward gives the hidden states,
the fused `token_logprobs` gives the log-prob of every response token (never the (N, V)
logits), and each sequence's log-prob is the *sum* over its response tokens (averaging would
favour long responses and change what beta means). `fastllm.rl.dpo_loss` turns the policy's
and the reference's log-probs into the per-pair losses; the step loss is their sum over the
step's pairs divided by the number of pairs of all micro-batches and ranks, so grad_accum and
the number of processes do not change it.

The reference model:
    precomputed  its log-probs are computed once before training, in eval mode (dropout off),
                 and travel with each pair of the dataset (no reference in memory while
                 training); a resumed run recomputes them from the initial weights, before the
                 checkpoint is loaded.
    live         computed every step: with PEFT the same model with its adapters disabled (one
                 copy of the base weights), else a frozen copy of the initial model.

Prompt and response are tokenised separately (fastllm.data.PreferenceDataset), so no token
merges across the boundary and the prompt gets exactly one bos. Logged per step (and as eval_*
on held-out pairs): loss, rewards/chosen and rewards/rejected (beta * log-ratio to the
reference, mean over pairs), accuracy (share of pairs whose chosen reward is higher), margin.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from fastllm.data import BatchLoader
from fastllm.ops import token_logprobs
from fastllm.rl.losses import DPO_LOSS_TYPES, dpo_loss

from . import build
from .checkpoint import resume_training_state
from .common import (
    autocast,
    enable_activation_checkpointing,
    freeze_parameters,
    optimizer_for,
    to_device,
    transformer_layers,
)
from .config import DPOConfig, as_config
from .distributed import wrap_model
from .export import export_final
from .loop import start_run
from .peft_glue import apply_peft

REFERENCES = ("precomputed", "live")
MODEL_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", "segment_ids")
# per-step sums kept beside the loss: chosen reward, rejected reward, accuracy, margin, tokens


class SequenceLogProbs(nn.Module):
    """model + the summed response log-prob of every sequence of a packed row, in one forward
    (so DDP and FSDP see the head used inside forward).

    forward(input_ids (1, N), labels (1, N) already shifted, position_ids, cu_seqlens (S+1,),
    max_seqlen, segment_ids (N,)) -> (S,) float32: sum over t in sequence s of
    log p(labels[t] | tokens <= t), labels -100 contributing 0."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen, segment_ids) -> Tensor:
        hidden = self.model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        weight = self.model.lm_head_weight
        logp = token_logprobs(hidden, weight.to(hidden.dtype), labels.reshape(-1))  # (N,)
        n_seqs = cu_seqlens.numel() - 1
        return torch.zeros(n_seqs, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, logp)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS}


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@torch.no_grad()
def precompute_reference(reference_logps, dataset, batch_size: int, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
    """(len(dataset), 2) reference log-probs (chosen, rejected) of every pair, batch_size pairs
    per packed forward. reference_logps(batch) -> (2P,) runs the reference (eval mode)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = to_device(build.pack_pairs(items), device)
        with autocast(device, dtype):
            logps = reference_logps(batch).float().cpu()
        out.append(torch.stack([logps[: len(items)], logps[len(items):]], dim=1))
    return torch.cat(out)


class WithReference:
    """A preference dataset whose items also carry ref_chosen_logp / ref_rejected_logp
    (0-dim tensors) from `ref` (len, 2); collate is `pack_pairs`."""

    def __init__(self, base, ref: Tensor):
        if ref.shape != (len(base), 2):
            raise ValueError(f"ref: expected shape ({len(base)}, 2), got {tuple(ref.shape)}")
        self.base, self.ref = base, ref

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["ref_chosen_logp"], item["ref_rejected_logp"] = self.ref[i, 0], self.ref[i, 1]
        return item

    collate = staticmethod(build.pack_pairs)


def _check(cfg: DPOConfig) -> None:
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.reference not in REFERENCES:
        raise ValueError(f"reference: expected one of {REFERENCES}, got {cfg.reference!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta: expected a positive value, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise ValueError(f"label_smoothing: expected 0 with loss_type='ipo', got {cfg.label_smoothing}")


def dpo(config: DPOConfig | str | dict | None = None, *, model=None, tokenizer=None, records=None,
        reference_model=None) -> dict:
    """Run DPO; returns {"step", "loss", "eval_loss", "eval_accuracy", "eval_margin", ...,
    "trainable_params"}.

    config: a DPOConfig, a YAML path or a dict of fields. model / tokenizer / records: ready
    objects instead of what the config names (records: dicts with prompt, chosen, rejected).
    reference_model: a separate reference (default: the initial policy, or with PEFT the base
    with adapters disabled)."""
    cfg = as_config(DPOConfig, config)
    _check(cfg)
    # ---- setup: devices, tokenizer, model, data
    info, device, dtype, out = start_run(cfg)
    records, tokenizer, model = build.chat_setup(cfg, info, "preference", records=records, tokenizer=tokenizer,
                                                 model=model)
    train_set, eval_set = build.preference_datasets(cfg, tokenizer, records)

    if cfg.peft:
        model = apply_peft(model, cfg.peft)
    n_trainable = freeze_parameters(model, cfg.freeze, cfg.train_layers)
    model.to(device)

    # ---- the reference: set up from the initial weights, before a checkpoint is loaded
    if reference_model is not None:
        ref_module, ref_context = SequenceLogProbs(reference_model.to(device).requires_grad_(False)), None
    elif cfg.peft:
        from fastllm.peft import disable_adapters

        ref_module, ref_context = SequenceLogProbs(model), lambda: disable_adapters(model)
    elif cfg.reference == "precomputed":
        ref_module, ref_context = SequenceLogProbs(model), None
    else:  # live, full fine-tuning: a frozen copy of the initial weights
        ref_module, ref_context = SequenceLogProbs(copy.deepcopy(model).requires_grad_(False)), None

    def reference_logps(batch: dict) -> Tensor:
        with torch.no_grad(), _eval_mode(ref_module), (ref_context() if ref_context else contextlib.nullcontext()):
            return ref_module(**model_inputs(batch))

    if cfg.reference == "precomputed":
        train_set = WithReference(train_set, precompute_reference(reference_logps, train_set, cfg.batch_size,
                                                                  device, dtype))
        if eval_set is not None:
            eval_set = WithReference(eval_set, precompute_reference(reference_logps, eval_set, cfg.batch_size,
                                                                    device, dtype))
        ref_module = None  # a separate reference model is no longer needed
    loader = BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loader.collate_fn = build.pack_pairs
    eval_data = build.eval_batches(eval_set, cfg.batch_size, cfg.eval_batches, info, build.pack_pairs)

    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = wrap_model(SequenceLogProbs(model), info, transformer_layers(model), device)
    optimizer, scheduler = optimizer_for(wrapped, cfg)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    adapters_only = bool(cfg.peft)
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # build.PAIR_STATS sums, tokens

    def loss_sum(batch: dict) -> Tensor:
        """The summed DPO loss of the batch's pairs (optimizer_step divides by all pairs)."""
        logps = wrapped(**model_inputs(batch))  # (2P,): chosen, then rejected
        ref = batch["ref_logps"] if cfg.reference == "precomputed" else reference_logps(batch)
        P = build.count_pairs(batch)
        res = dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing)
        stats[:4] += torch.stack([res.chosen_rewards.sum(), res.rejected_rewards.sum(), res.accuracy.sum(),
                                  res.margin.sum()]).double()
        stats[4] += batch["input_ids"].numel()
        return res.losses.sum()

    # ---- train (build.train_pairs -> fastllm.train.loop: steps, eval, logging, checkpoints, final eval + plot)
    result = build.train_pairs(cfg, info, step, loader, loss_sum, wrapped, optimizer, scheduler, eval_data, stats,
                               device=device, dtype=dtype, adapters_only=adapters_only)

    # ---- finish: the exported model or adapters
    export_final(model, wrapped, tokenizer, out / "final", info, adapters_only=adapters_only)
    result["trainable_params"] = n_trainable
    return result
