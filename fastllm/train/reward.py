"""A reward model from preference pairs: a decoder plus a scalar head, Bradley-Terry loss.

    from fastllm.train import RewardConfig, reward
    reward(RewardConfig(model="runs/sft/final", max_steps=200))             # trunk from an SFT model
    reward(RewardConfig(model="tiny-llama", peft={"method": "lora", "r": 8}))
    scorer = RewardScorer(from_pretrained("runs/reward/final"), tokenizer)
    scorer(["What is 2+2?"], ["4"])                                         # (1,) normalised rewards

The model is the trunk's SequenceClassification class (fastllm.models.heads) with one output:
r(x, y) = w . h_last, h_last the hidden state at the last real token of prompt + response (the
EOS the data appends, never a pad after it). A step: P pairs become one packed row (the P
chosen sequences, then the P rejected ones, each its own cu_seqlens segment;
fastllm.train.build.pack_pairs), one forward gives the 2P rewards, and the loss is
fastllm.rl.bradley_terry_loss, -log sigmoid(r_c - r_r - m), summed over the step's pairs and
divided by the pairs of all micro-batches and ranks (grad_accum and the number of processes
do not change it). The margin m is a constant or a numeric field of every record.

Prompt and response are tokenised as for SFT and DPO (fastllm.data.PreferenceDataset: the chat
template, one bos, the response encoded apart, eos at the end); `RewardScorer` builds its
inputs the same way. Logged per step (and as eval_* on held-out pairs): loss, accuracy (share
of pairs with r_c > r_r), margin (mean r_c - r_r), rewards/chosen, rewards/rejected.

Normalisation (normalize=True): after training, the rewards of reference pairs (held-out, else
training pairs; both sides) have mean mu and std sigma; the head stores the affine map
x -> (x - mu) / sigma as TaskHead(output_scale=1/sigma, output_shift=-mu/sigma) (`predict()`
returns scores * output_scale + output_shift). So `predict()` and `RewardScorer` give
rewards with mean 0 and std 1 on the reference pairs; `scores()` and transformers'
AutoModelForSequenceClassification give the raw r (transformers does not read the stored map).

Export: output_dir/final is a transformers LlamaForSequenceClassification (GPT2...) folder with
num_labels 1 and pad_token_id, plus the tokenizer. With LoRA the score head is trained beside the
adapters, and the export is the merged model (no PEFT adapter folder: PEFT would need the head
as modules_to_save, which fastllm.peft's adapter format does not carry); checkpoints hold the
adapters and the head.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastllm.data import BatchLoader, PreferenceDataset, build_sft_example, train_test_split
from fastllm.rl import bradley_terry_loss

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
from .config import RewardConfig, as_config
from .distributed import wrap_model
from .export import export_final
from .loop import start_run
from .peft_glue import apply_peft

MODEL_KEYS = ("input_ids", "position_ids", "cu_seqlens", "max_seqlen")
# per-step sums kept beside the loss: chosen reward, rejected reward, accuracy, margin, tokens


class PackedRewards(nn.Module):
    """model + its raw reward of every sequence of a packed row, in one forward (so DDP and FSDP
    see the head used inside forward).

    forward(input_ids (1, N), position_ids (1, N), cu_seqlens (S+1,), max_seqlen) -> (S,) float32:
    the head at each sequence's last token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> Tensor:
        return self.model.scores(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                 max_seqlen=max_seqlen)[:, 0]


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS}


def collate_pairs(items: list[dict]) -> dict:
    """build.pack_pairs plus margins (P,) when the items carry one."""
    batch = build.pack_pairs(items)
    if "margin" in items[0]:
        batch["margins"] = torch.stack([it["margin"] for it in items])
    return batch


class WithMargins:
    """A preference dataset whose items also carry `margin` (0-dim float32); collate is
    `collate_pairs`."""

    def __init__(self, base, margins: Sequence[float]):
        if len(margins) != len(base):
            raise ValueError(f"margins: expected {len(base)} values, got {len(margins)}")
        self.base, self.margins = base, torch.tensor(margins, dtype=torch.float32)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {**self.base[i], "margin": self.margins[i]}

    collate = staticmethod(collate_pairs)


def _record_margin(record: dict, key: str, index: int) -> float:
    value = record.get(key) if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"margin: records[{index}]: field {key!r}: expected a finite number, got {value!r}")
    return float(value)


def reward_datasets(cfg: RewardConfig, tokenizer, records: list):
    """Tokenised pairs (fastllm.data.PreferenceDataset), split into train / eval, with each
    pair's margin when cfg.margin names a record field."""
    held = None
    if cfg.eval_batches > 0 and len(records) >= 2:
        records, held = train_test_split(records, cfg.eval_fraction, seed=cfg.seed)

    def make(recs):
        data = PreferenceDataset(recs, tokenizer, cfg.max_length, system=cfg.system, too_long=cfg.too_long)
        if not isinstance(cfg.margin, str):
            return data
        skipped = set(data.skipped)
        return WithMargins(data, [_record_margin(r, cfg.margin, i) for i, r in enumerate(recs) if i not in skipped])

    return make(records), (make(held) if held else None)


def _train_head(model: nn.Module, freeze: Sequence[str]) -> int:
    """The score head starts random, so it is trained whatever train_layers or PEFT froze, unless
    a freeze glob names it. Returns the number of trainable parameters."""
    prefixes = type(model).head_param_prefixes
    for name, p in model.named_parameters():
        if name.startswith(prefixes) and not any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check(cfg: RewardConfig, records: list) -> None:
    if cfg.peft and cfg.peft.get("method", "lora") != "lora":
        raise ValueError(f"peft.method: a reward model supports lora (its score head sits on the trunk), got "
                         f"{cfg.peft.get('method')!r}")
    if isinstance(cfg.margin, str):
        for i, r in enumerate(records):
            _record_margin(r, cfg.margin, i)
    elif not math.isfinite(cfg.margin):
        raise ValueError(f"margin: expected a finite number or a record field name, got {cfg.margin!r}")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain head model (no LoRA modules) with every LoRA adapter folded into its weights."""
    from fastllm.peft import lora_modules

    state = model.state_dict()
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            if m.merged is None and m.active_adapter is not None and not m.disabled:
                state[f"{name}.weight"] = (m.weight.to(torch.float64 if m.weight.dtype == torch.float64
                                                       else torch.float32)
                                           + m.delta_weight(m.active_adapter)).to(m.weight.dtype)
    plain = type(model)(model.config, dataclasses.replace(model.head))
    keep = set(plain.state_dict())
    plain.load_state_dict({k: v for k, v in state.items() if k in keep}, strict=True)
    return plain.to(next(model.parameters()).device)


@torch.no_grad()
def reference_stats(model: nn.Module, dataset, n_pairs: int, batch_size: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[float, float, int]:
    """(mean, std, count) of the raw rewards of both sides of the first n_pairs pairs of dataset
    (std over the samples, ddof 0), in eval mode."""
    was = model.training
    model.eval()
    try:
        rewards = []
        n = min(n_pairs, len(dataset))
        for start in range(0, n, batch_size):
            batch = to_device(collate_pairs([dataset[i] for i in range(start, min(start + batch_size, n))]), device)
            with autocast(device, dtype):
                rewards.append(PackedRewards(model)(**model_inputs(batch)).double().cpu())
    finally:
        model.train(was)
    r = torch.cat(rewards)
    return float(r.mean()), float(r.std(correction=0)), r.numel()


def reward(config: RewardConfig | str | dict | None = None, *, model=None, tokenizer=None, records=None) -> dict:
    """Train a reward model; returns {"step", "loss", "eval_loss", "eval_accuracy", "eval_margin",
    "reward_mean", "reward_std" (raw rewards on the reference pairs, with normalize),
    "trainable_params", ...}.

    config: a RewardConfig, a YAML path or a dict of fields. model: a ready head model
    (fastllm.models.LlamaForSequenceClassification / GPT2..., num_labels 1) instead of what the
    config names; tokenizer / records (dicts with prompt, chosen, rejected): ready objects."""
    cfg = as_config(RewardConfig, config)
    # ---- setup: devices, tokenizer, model, data
    info, device, dtype, out = start_run(cfg)
    if cfg.peft and info.mode == "fsdp":
        raise NotImplementedError("distributed: exporting a LoRA reward model from an FSDP run is not supported; "
                                  "use ddp")
    records = build.read_records(cfg.data, kind="preference") if records is None else records
    _check(cfg, records)
    records, tokenizer, model = build.chat_setup(cfg, info, "preference", records=records, tokenizer=tokenizer,
                                                 model=model, make_model=build.get_reward_model)
    if not hasattr(model, "scores") or model.head.num_labels != 1:
        raise ValueError(f"model: expected a sequence-classification head model with num_labels=1, got "
                         f"{type(model).__name__}")
    if info.is_main and tokenizer.pad_id is not None and tokenizer.pad_id == tokenizer.eos_id:
        warnings.warn(f"tokenizer: pad_id == eos_id ({tokenizer.pad_id}); transformers finds the last real token "
                      "as the last non-pad one, so on the export it reads the token before the EOS (fastllm reads "
                      "the EOS); use a tokenizer with its own pad token for matching scores", stacklevel=2)
    train_set, eval_set = reward_datasets(cfg, tokenizer, records)

    if cfg.peft:
        model = apply_peft(model, cfg.peft)
    freeze_parameters(model, cfg.freeze, cfg.train_layers)
    n_trainable = _train_head(model, cfg.freeze)
    model.to(device)
    loader = BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loader.collate_fn = collate_pairs
    eval_data = build.eval_batches(eval_set, cfg.batch_size, cfg.eval_batches, info, collate_pairs)

    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = wrap_model(PackedRewards(model), info, transformer_layers(model), device)
    optimizer, scheduler = optimizer_for(wrapped, cfg)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    adapters_only = bool(cfg.peft)
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # build.PAIR_STATS sums, tokens
    constant_margin = None if isinstance(cfg.margin, str) or cfg.margin == 0 else cfg.margin

    def loss_sum(batch: dict) -> Tensor:
        """The summed Bradley-Terry loss of the batch's pairs (optimizer_step divides by all pairs)."""
        r = wrapped(**model_inputs(batch)).float()  # (2P,): chosen, then rejected
        P = build.count_pairs(batch)
        r_c, r_r = r[:P], r[P:]
        losses = bradley_terry_loss(r_c, r_r, batch.get("margins", constant_margin))
        d = (r_c - r_r).detach()
        stats[:4] += torch.stack([r_c.detach().sum(), r_r.detach().sum(), (d > 0).sum(), d.sum()]).double()
        stats[4] += batch["input_ids"].numel()
        return losses.sum()

    # ---- train (build.train_pairs -> fastllm.train.loop: steps, eval, logging, checkpoints, final eval + plot)
    result = build.train_pairs(cfg, info, step, loader, loss_sum, wrapped, optimizer, scheduler, eval_data, stats,
                               device=device, dtype=dtype, adapters_only=adapters_only)

    # ---- finish: normalisation on reference pairs, then the exported model (LoRA merged)
    final = merged_copy(model) if cfg.peft else model
    if cfg.normalize:
        ref_set = eval_set if eval_set is not None else train_set
        mean, std, n = reference_stats(final, ref_set, cfg.normalize_samples, cfg.batch_size, device, dtype)
        if not std > 0:
            raise ValueError(f"normalize: the {n} reference rewards are all equal ({mean}); nothing to normalise "
                             "by (set normalize=false)")
        final.head = dataclasses.replace(final.head, output_scale=1.0 / std, output_shift=-mean / std)
        result.update(reward_mean=mean, reward_std=std, reward_samples=n)
    export_final(final, wrapped, tokenizer, out / "final", info)
    result["trainable_params"] = n_trainable
    return result


class RewardScorer:
    """score(prompts, responses) -> (B,) float32 rewards of a trained reward model, in eval mode
    without gradients, normalised by the head's stored map when it has one (raw otherwise).

    Each prompt + response is built as training built it (fastllm.data.build_sft_example: the
    chat template, one bos, the response encoded apart, eos at the end) and batch_size of them
    are scored per packed forward. `score_tokens` scores rows that are already token ids (PPO
    rollouts)."""

    def __init__(self, model: nn.Module, tokenizer, *, system: str | None = None, max_length: int | None = None,
                 batch_size: int = 32):
        if not hasattr(model, "scores") or model.head.num_labels != 1:
            raise ValueError(f"model: expected a sequence-classification head model with num_labels=1, got "
                             f"{type(model).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_length = max_length if max_length is not None else model.config.max_position_embeddings
        self.batch_size = batch_size

    def _run(self, fn):
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            self.model.train(was)

    def encode(self, prompt: str, response: str) -> list[int]:
        """The token ids training saw for this pair side: bos, prompt template, response, eos."""
        return build_sft_example(self.tokenizer, (prompt, response), self.max_length, system=self.system)["input_ids"]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"responses: expected {len(prompts)} (one per prompt), got {len(responses)}")
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        device = next(self.model.parameters()).device
        items = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                ids = torch.tensor(self.encode(p, r))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"prompts[{i}], responses[{i}]: {exc}") from None
            items.append({"input_ids": ids, "labels": ids})

        def run():
            out = []
            for s in range(0, len(items), self.batch_size):
                batch = to_device(build.pack_examples(items[s:s + self.batch_size]), device)
                out.append(self.model.predict(batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                                              position_ids=batch["position_ids"], max_seqlen=batch["max_seqlen"]))
            return torch.cat(out).float()

        return self._run(run)

    def score_tokens(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B,) rewards of token rows (B, T), read at each row's last real token (the rightmost
        attention_mask 1; padding left, right or both). Positions count real tokens only, so a
        padded row scores as the same tokens unpadded."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape (B, T), got {list(tokens.shape)}")
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask: expected shape {list(tokens.shape)} (as tokens), got "
                                 f"{list(attention_mask.shape)}")
            if not bool(attention_mask.bool().any(-1).all()):
                raise ValueError("attention_mask: every row needs at least one real token")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            positions = None
        return self._run(lambda: self.model.predict(tokens, attention_mask=attention_mask,
                                                    position_ids=positions).float())
