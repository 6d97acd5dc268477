"""Set-up shared by the loops: tokenizer, model, datasets and the eval batches, with the
input checks that must fail before training starts (empty data, sequences longer than the
context, a tokenizer whose vocabulary does not fit the model)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastllm import models
from fastllm.data import (
    MLMDataset,
    PackedDataset,
    PreferenceDataset,
    SFTDataset,
    load_corpus,
    load_instructions,
    load_preferences,
    train_test_split,
)
from fastllm.data.corpus import CORPORA
from fastllm.data.files import check_chat_record, check_preference_record, read_records_file, read_text_file
from fastllm.tokenizer import Tokenizer, format_chat, load_tokenizer

from .distributed import DistInfo

# --------------------------------------------------------------------------- raw data

def read_texts(data) -> list[str]:
    """A shipped corpus name, or text file path(s) (one document per file)."""
    if isinstance(data, str) and data in CORPORA:
        return load_corpus(data)
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise ValueError("data: empty dataset (no files given)")
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data: {str(p)!r} is neither a shipped corpus ({', '.join(CORPORA)}) "
                                    "nor an existing file")
        texts.append(read_text_file(p))
    if not any(t.strip() for t in texts):
        raise ValueError(f"data: empty dataset (the files {[str(p) for p in paths]} hold no text)")
    return texts


def is_token_file(data) -> bool:
    return isinstance(data, (str, os.PathLike)) and str(data).endswith(".bin")


def read_records(data, kind: str = "chat") -> list:
    """Chat records (kind "chat") or preference pairs ("preference"): a shipped set
    ("instructions", "preferences"), or a .jsonl / .json file of records, each checked."""
    shipped = {"instructions": load_instructions, "preferences": load_preferences}
    if isinstance(data, str) and data in shipped:
        return shipped[data]()
    if not os.path.isfile(data):
        raise FileNotFoundError(f"data: {str(data)!r} is neither a shipped set ({', '.join(shipped)}) nor an "
                                "existing .jsonl/.json file")
    records = read_records_file(data, check_preference_record if kind == "preference" else check_chat_record)
    if not records:
        raise ValueError(f"data: empty dataset ({str(data)!r} holds no records)")
    return records


def check_prompt_record(record, where: str) -> None:
    """A generation prompt: {"prompt": str} (other keys ignored), or a chat record whose last
    assistant turn is dropped; otherwise a ValueError naming `where` and the field."""
    if isinstance(record, dict) and "prompt" in record and "messages" not in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"data: {where}: field 'prompt': expected a string, got "
                             f"{type(record['prompt']).__name__} {record['prompt']!r:.60}")
        return
    if isinstance(record, dict) and "messages" in record:
        check_chat_record(record, where)
        return
    raise ValueError(f"data: {where}: expected a JSON object with 'prompt' or 'messages', got {record!r:.60}")


def read_prompt_records(data) -> list:
    """Prompts for rollouts: the shipped instruction set ("instructions"; its prompts), or a
    .jsonl / .json file of {"prompt": ...} or {"messages": [...]} records, each checked."""
    if isinstance(data, str) and data == "instructions":
        return load_instructions()
    if not os.path.isfile(data):
        raise FileNotFoundError(f"data: {str(data)!r} is neither the shipped set (instructions) nor an existing "
                                ".jsonl/.json file")
    records = read_records_file(data, check_prompt_record)
    if not records:
        raise ValueError(f"data: empty dataset ({str(data)!r} holds no records)")
    return records

def prompt_texts(records, system) -> list[str]:
    """The generation prompts as text (to train a tokenizer on when none is given)."""
    from fastllm.data.prompts import _conversation
    from fastllm.tokenizer import format_prompt

    return [format_prompt(_conversation(r), system=system) for r in records]


def rollout_setup(cfg, method: str, *, prompts, tokenizer, model, reward_model) -> tuple:
    """The opening of an on-policy RL run (PPO, GRPO): data parallelism only (FSDP refused, naming
    `method`), `loop.start_run` (processes, device, dtype, seeds, output_dir), the prompts,
    tokenizer and model (`load_prompts`), the stop and pad ids, and the reward model the config
    names when none is given. Returns (info, device, dtype, out, items, tokenizer, model, eos_id,
    pad_id, reward_model); items are the prompts as token-id lists."""
    from .loop import start_run

    if cfg.distributed == "fsdp":
        raise ValueError(f"distributed: {method} supports ddp (or none), got fsdp")
    info, device, dtype, out = start_run(cfg)
    items, tokenizer, model = load_prompts(cfg, info, prompts, tokenizer, model)
    eos_id = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    if reward_model is None and cfg.reward_model is not None:
        reward_model = models.from_pretrained(cfg.reward_model)
    return info, device, dtype, out, items, tokenizer, model, eos_id, pad_id, reward_model


def load_prompts(cfg, info: DistInfo, prompts, tokenizer, model):
    """The rollout prompts of PPO and GRPO as token-id lists, with the tokenizer and model they
    need: (items, tokenizer, model). prompts: token-id lists (used as given, each at most
    cfg.max_prompt_length), records / questions for `PromptDataset` (chat template, bos; over
    max_prompt_length skipped), or None (cfg.data). tokenizer / model: ready objects, else
    what the config names (a model sized for the longest prompt plus max_new_tokens)."""
    from fastllm.data import PromptDataset

    token_prompts = prompts is not None and len(prompts) > 0 and isinstance(prompts[0], (list, tuple)) and \
        all(isinstance(t, int) for t in prompts[0])
    records = None
    if not token_prompts:
        records = read_prompt_records(cfg.data) if prompts is None else prompts
    if tokenizer is None and not (token_prompts and model is not None):
        tokenizer = get_tokenizer(cfg, info, lambda: prompt_texts(records or [], cfg.system))
    if model is None:
        model = get_model(cfg, tokenizer.vocab_size if tokenizer is not None else None, cfg.max_new_tokens + 1)
    if token_prompts:
        items = [list(p) for p in prompts]
        too_long = [i for i, p in enumerate(items) if len(p) > cfg.max_prompt_length]
        if too_long:
            raise ValueError(f"prompts[{too_long[0]}]: {len(items[too_long[0]])} tokens, more than "
                             f"max_prompt_length={cfg.max_prompt_length}")
    else:
        items = PromptDataset(records, tokenizer, cfg.max_prompt_length, system=cfg.system, skip_too_long=True).examples
    check_fit(model, tokenizer.vocab_size if tokenizer is not None else None,
              max(len(p) for p in items) + cfg.max_new_tokens)
    return items, tokenizer, model


# --------------------------------------------------------------------------- tokenizer and model

def get_tokenizer(cfg, info: DistInfo, training_texts: Callable[[], list[str]]):
    """The configured tokenizer; else the checkpoint's; else one trained on the data (rank 0
    trains and saves it under output_dir/tokenizer, a resumed run reloads it)."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if os.path.isdir(cfg.model):
        return load_tokenizer(cfg.model)
    saved = Path(cfg.output_dir) / "tokenizer"
    if info.is_main and not saved.is_dir():
        texts = training_texts()
        if not texts:
            raise ValueError("data: empty dataset (nothing to train a tokenizer on)")
        tok = Tokenizer.train(texts, vocab_size=cfg.tokenizer_vocab_size)
        tok.save(saved)
    info.barrier()
    return load_tokenizer(saved)


def preset_config(cfg, vocab_size: int | None):
    """The config of the preset cfg.model with cfg.model_overrides, its vocab sized to the
    tokenizer (vocab_size) unless the overrides say otherwise; an unknown name is an error."""
    if cfg.model not in models.PRESETS:
        raise ValueError(f"model: {cfg.model!r} is neither a preset ({', '.join(models.PRESETS)}) nor an existing "
                         "checkpoint directory")
    overrides = dict(cfg.model_overrides)
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    return models.preset(cfg.model, **overrides)


def get_model(cfg, vocab_size: int | None, context: int) -> torch.nn.Module:
    """A preset (randomly initialised under the seed; its vocab sized to the tokenizer unless
    model_overrides says otherwise) or a checkpoint directory. Checks vocab and context."""
    if os.path.isdir(cfg.model):
        model = models.from_pretrained(cfg.model)
    else:
        model = models.build_model(preset_config(cfg, vocab_size))
    if context is not None:
        check_fit(model, vocab_size, context)
    return model


def check_fit(model, vocab_size: int | None, context: int, objective: str | None = None) -> None:
    mcfg = model.config
    encoder = hasattr(model, "mlm_head")
    if objective == "mlm" and not encoder:
        raise ValueError(f"objective: mlm needs an encoder with a masked-LM head (e.g. model=bert-base), but "
                         f"{type(model).__name__} is a decoder; use objective=causal")
    if objective == "causal" and encoder:
        raise ValueError(f"objective: causal needs a decoder, but {type(model).__name__} is a bidirectional "
                         "encoder; use objective=mlm")
    if vocab_size is not None and vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer: its vocabulary has {vocab_size} tokens but the model's vocab_size is "
                         f"{mcfg.vocab_size}; ids >= {mcfg.vocab_size} would not fit (use a matching tokenizer "
                         "or a larger model vocab_size)")
    if context > mcfg.max_position_embeddings:
        raise ValueError(f"seq_len/max_length: {context} tokens exceed the model's context of "
                         f"{mcfg.max_position_embeddings} positions (max_position_embeddings)")


def get_reward_model(cfg, tokenizer) -> torch.nn.Module:
    """A decoder with a scalar reward head (its trunk's SequenceClassification class, TaskHead
    num_labels=1, regression, pad_token_id = the tokenizer's pad), through get_head_model: a
    preset (random, under the seed; vocab sized to the tokenizer unless model_overrides says
    otherwise), a causal-LM checkpoint (trunk loaded, head fresh) or a reward-model checkpoint
    (head loaded too)."""
    from fastllm.models.checkpoint import read_config

    model_type = (read_config(cfg.model).get("model_type") if os.path.isdir(cfg.model)
                  else models.preset(cfg.model).model_type if cfg.model in models.PRESETS else None)
    _check_decoder(model_type, f"model: {cfg.model!r} holds a {model_type!r} model")
    head = models.TaskHead(num_labels=1, problem_type="regression", pad_token_id=tokenizer.pad_id)
    model = get_head_model(cfg, "sequence_classification", head, tokenizer.vocab_size, None)
    if model.head.pad_token_id is None:
        model.head.pad_token_id = tokenizer.pad_id
    return model


def _check_decoder(model_type, what: str) -> None:
    if model_type == "bert":
        raise ValueError(f"{what}, a bidirectional encoder; a reward model needs a decoder (Llama family, GPT-2), "
                         "whose last token has seen the whole prompt + response")


# --------------------------------------------------------------------------- datasets

class Subset:
    """Items `indices` of a dataset, keeping its collate and set_epoch."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)
        self.collate = getattr(base, "collate", None)
        if hasattr(base, "set_epoch"):
            self.set_epoch = base.set_epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def split_tail(dataset, fraction: float, want_eval: bool):
    """(train, eval): the last ~fraction of the items (at least one) are held out."""
    n = len(dataset)
    if not want_eval or n < 2:
        return dataset, None
    n_eval = min(n - 1, max(1, round(n * fraction)))
    return Subset(dataset, range(n - n_eval)), Subset(dataset, range(n - n_eval, n))


def pretrain_datasets(cfg, tokenizer, vocab_size: int):
    """Packed blocks of cfg.seq_len tokens (+ MLM masking), split into train / eval."""
    if is_token_file(cfg.data):
        if not os.path.isfile(cfg.data):
            raise FileNotFoundError(f"data: {str(cfg.data)!r} does not exist (a .bin file of token ids)")
        itemsize, size = np.dtype(cfg.bin_dtype).itemsize, os.path.getsize(cfg.data)
        if size % itemsize:
            raise ValueError(f"data: {str(cfg.data)!r} holds {size} bytes, not a whole number of {cfg.bin_dtype} "
                             f"tokens ({itemsize} bytes each); is bin_dtype right?")
        tokens = np.fromfile(cfg.data, dtype=np.dtype(cfg.bin_dtype)).astype(np.int64)
        if tokens.size == 0:
            raise ValueError(f"data: empty dataset ({str(cfg.data)!r} holds no tokens)")
        docs = [torch.from_numpy(tokens)]
    else:
        add_bos, add_eos = tokenizer.bos_id is not None, tokenizer.eos_id is not None
        docs = tokenizer.encode(read_texts(cfg.data), add_bos=add_bos, add_eos=add_eos)
        if sum(len(d) for d in docs) == 0:
            raise ValueError("data: empty dataset (no tokens after encoding)")
    try:
        blocks = PackedDataset(docs, cfg.seq_len, vocab_size=vocab_size,
                               doc_boundaries=cfg.doc_boundaries and cfg.objective == "causal")
    except ValueError as exc:
        raise ValueError(f"data: {exc}") from None
    train, held = split_tail(blocks, cfg.eval_fraction, cfg.eval_batches > 0)
    if cfg.objective == "mlm":
        if tokenizer is None or tokenizer.mask_id is None:
            raise ValueError("tokenizer: masked LM needs a tokenizer with a mask token")
        def wrap(d, seed):
            return MLMDataset.from_tokenizer(d, tokenizer, mask_prob=cfg.mask_prob, seed=seed)
        train, held = wrap(train, cfg.seed), (wrap(held, cfg.seed + 1) if held is not None else None)
    elif cfg.objective != "causal":
        raise ValueError(f"objective: expected causal or mlm, got {cfg.objective!r}")
    return train, held


def chat_setup(cfg, info: DistInfo, kind: str, *, records=None, tokenizer=None, model=None, make_model=None):
    """What a chat-format method (SFT, DPO, reward model) starts from: its records (given, or
    read from cfg.data: kind "chat" or "preference"), the tokenizer (given, the checkpoint's, or
    trained on the rendered records) and the model (given, or make_model(cfg, tokenizer), by
    default the causal LM get_model builds), checked to fit. Returns (records, tokenizer, model)."""
    records = read_records(cfg.data, kind=kind) if records is None else records
    if not records:
        raise ValueError("data: empty dataset (no records)")
    texts = chat_texts if kind == "chat" else preference_texts
    if tokenizer is None:
        tokenizer = get_tokenizer(cfg, info, lambda: texts(records, cfg.system))
    if model is None:
        model = make_model(cfg, tokenizer) if make_model else get_model(cfg, tokenizer.vocab_size, cfg.max_length)
    check_fit(model, tokenizer.vocab_size, cfg.max_length)
    return records, tokenizer, model


def split_datasets(cfg, records, make):
    """Records split into train / held-out (eval_fraction, seeded; none when eval_batches is 0),
    each made into a dataset by make(records); the held-out one is None when empty."""
    if not records:
        raise ValueError("data: empty dataset (no records)")
    held = None
    if cfg.eval_batches > 0 and len(records) >= 2:
        records, held = train_test_split(records, cfg.eval_fraction, seed=cfg.seed)
    return make(records), (make(held) if held else None)


def sft_datasets(cfg, tokenizer, records):
    """Tokenised chat examples (prompt labels -100), split into train / eval."""
    return split_datasets(cfg, records, lambda recs: SFTDataset(recs, tokenizer, cfg.max_length, system=cfg.system,
                                                                too_long=cfg.too_long))


def preference_datasets(cfg, tokenizer, records):
    """Tokenised (prompt, chosen, rejected) pairs (fastllm.data.PreferenceDataset: prompt and
    response encoded separately, one bos), split into train / eval."""
    return split_datasets(cfg, records, lambda recs: PreferenceDataset(recs, tokenizer, cfg.max_length,
                                                                       system=cfg.system, too_long=cfg.too_long))


def preference_texts(records, system=None) -> list[str]:
    """Both rendered conversations of every pair (to train a tokenizer on)."""
    return [format_chat((r["prompt"], r[side]), system=system)[1] for r in records for side in ("chosen", "rejected")]


PAIR_STATS = ("rewards/chosen", "rewards/rejected", "accuracy", "margin")  # summed per step, then means


def count_pairs(batch: dict) -> int:
    """The count a pairwise loss (DPO, reward model) is normalised by: the batch's pairs."""
    return int(batch["num_pairs"])


def pair_metrics(stats: Tensor, n_pairs: float, info: DistInfo, prefix: str = "") -> dict:
    """Means over pairs of a step's (or an evaluation's) summed PAIR_STATS (+ tokens read, last),
    all ranks pooled."""
    if info.world_size > 1:
        torch.distributed.all_reduce(stats)
    values = (stats[:4] / max(n_pairs, 1.0)).tolist()
    out = {prefix + name: v for name, v in zip(PAIR_STATS, values, strict=True)}
    out[prefix + "tokens"] = int(stats[4])
    return out


def train_pairs(cfg, info: DistInfo, step: int, loader, loss_sum, wrapped, optimizer, scheduler, eval_data,
                stats: Tensor, *, device, dtype, adapters_only: bool) -> dict:
    """The training run of a pairwise method (DPO, the reward model) through `train_loop`, from
    `step`: each step is loop.supervised_step over `loader` with count_fn=count_pairs (the loss
    normalised per pair) plus the means of the PAIR_STATS its loss closure sums into `stats`
    (`pairs` is the step's pair count, `tokens` what the forwards read); the held-out eval does
    the same over `eval_data` (none without it); checkpoints hold the weights (the adapters with
    adapters_only), AdamW, the data order and the RNGs. Returns train_loop's result."""
    from .checkpoint import save_training_state
    from .loop import held_out_eval, supervised_step, train_loop

    base_step = supervised_step(loader, loss_sum, wrapped, optimizer, scheduler, cfg, info, device=device,
                                dtype=dtype, count_fn=count_pairs)

    def step_fn(step: int) -> dict:
        stats.zero_()
        metrics = base_step(step)
        metrics["pairs"] = metrics["tokens"]
        metrics.update(pair_metrics(stats, metrics["pairs"], info))
        return metrics

    base_eval = held_out_eval(wrapped, loss_sum, eval_data, device=device, dtype=dtype, world_size=info.world_size,
                              count_fn=count_pairs)

    def run_eval() -> dict:
        stats.zero_()
        res = base_eval()
        metrics = {"eval_loss": res["eval_loss"], "eval_pairs": res["eval_tokens"]}
        metrics.update(pair_metrics(stats, res["eval_tokens"], info, prefix="eval_"))
        return metrics

    def save(step: int):
        return save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info,
                                   trainable_only=adapters_only)

    wrapped.train()
    return train_loop(cfg, info, step, step_fn, save=save, evaluate=run_eval if base_eval is not None else None)


def pack_pairs(items: list[dict]) -> dict:
    """P preference pairs as one packed row (1, N): the P chosen sequences, then the P rejected
    ones, each its own cu_seqlens segment with positions from 0 (so one forward serves both
    sides). Adds segment_ids (N,) (which of the 2P sequences a token is in), num_pairs, and
    ref_logps (2P,) when the items carry cached reference log-probs."""
    seqs = [{"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
            for side in ("chosen", "rejected") for it in items]
    batch = pack_examples(seqs)
    lengths = torch.tensor([s["input_ids"].numel() for s in seqs])
    batch["segment_ids"] = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    batch["num_pairs"] = len(items)
    if "ref_chosen_logp" in items[0]:
        batch["ref_logps"] = torch.stack([it[f"ref_{side}_logp"] for side in ("chosen", "rejected") for it in items])
    return batch


def chat_texts(records, system=None) -> list[str]:
    return [format_chat(r, system=system)[1] for r in records]


def pack_examples(items: list[dict]) -> dict:
    """Concatenate variable-length examples into one row (1, N) with cu_seqlens, so attention
    stays inside each example and positions restart at 0 (no padding)."""
    lengths = [it["input_ids"].numel() for it in items]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return {"input_ids": torch.cat([it["input_ids"] for it in items])[None],
            "labels": torch.cat([it["labels"] for it in items])[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seqlens": cu, "max_seqlen": max(lengths)}


def pad_examples(pad_id: int):
    """Right-padded rows (B, L) with an attention mask (the non-packed layout)."""
    from fastllm.data import collate_padded

    def collate(items: list[dict]) -> dict:
        batch = collate_padded(items, pad_id)
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    return collate


def eval_batches(dataset, batch_size: int, max_batches: int, info: DistInfo, collate=None) -> list[dict]:
    """Up to max_batches batches of this rank's share of `dataset`; every rank gets the same
    number of batches (FSDP needs matching forwards)."""
    if dataset is None or max_batches <= 0:
        return []
    per_rank = len(dataset) // info.world_size
    idx = [info.rank + info.world_size * j for j in range(per_rank)][: batch_size * max_batches]
    collate = collate or dataset.collate
    return [collate([dataset[i] for i in idx[s:s + batch_size]]) for s in range(0, len(idx), batch_size)]


# --------------------------------------------------------------------------- task heads

def task_texts(records: list[dict]) -> list[str]:
    """The texts of task records (tagged sentences joined by spaces), to train a tokenizer on."""
    return [r["text"] if "text" in r else " ".join(r["tokens"]) for r in records]


def get_head_model(cfg, kind: str, head, vocab_size: int | None, context: int | None) -> torch.nn.Module:
    """A task-head model of `kind` ("sequence_classification" | "token_classification"):
    a preset with a fresh head (vocab sized to the tokenizer); a checkpoint that already is
    this head (continued, its stored head kept); or a new head on a checkpoint's trunk
    (`from_pretrained(dir, cls=<head class>, head=head)`)."""
    from fastllm.models import registry
    from fastllm.models.checkpoint import read_config
    from fastllm.models.heads import build_head_model

    if os.path.isdir(cfg.model):
        hf = read_config(cfg.model)
        entry = registry.lookup(hf.get("model_type"))
        try:
            cls = entry.head_class(kind)
        except ValueError:
            raise ValueError(f"task: a {kind} head needs a trunk that has one; {cfg.model!r} is a "
                             f"{hf.get('model_type')} model (token classification: a BERT encoder)") from None
        if entry.class_for(hf.get("architectures")) is cls:
            model = models.from_pretrained(cfg.model)
            if model.head.num_labels != head.num_labels or model.head.problem_type != head.problem_type:
                raise ValueError(f"model: {cfg.model!r} holds a {model.head.problem_type} head with "
                                 f"{model.head.num_labels} labels, but the data needs {head.problem_type} with "
                                 f"{head.num_labels}")
        else:
            model = models.from_pretrained(cfg.model, cls=cls, head=head)
    else:
        mcfg = preset_config(cfg, vocab_size)
        try:
            model = build_head_model(mcfg, kind, head)
        except ValueError:
            raise ValueError(f"task: a {kind} head needs a trunk that has one; {cfg.model!r} is a "
                             f"{mcfg.model_type} model (token classification: BERT, e.g. tiny-bert)") from None
    if context is not None:
        check_fit(model, vocab_size, context)
    return model


