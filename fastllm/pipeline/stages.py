"""The pipeline's stages: each a plain function `stage(ctx) -> StageResult` that trains (or
builds) one thing from what earlier stages left in ctx.artefacts, and returns its summary row
and the paths of what it exported. Adding a method to the pipeline is one more function here
and one more entry in `STAGES`.

Every stage writes under ctx.out / <stage name>, a folder that does not change between runs,
so a stage killed half-way resumes through its trainer's own checkpoints (`resume="auto"`).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastllm import models
from fastllm.data import load_corpus, load_instructions
from fastllm.peft import PrefixTuningModel, PromptTuningModel
from fastllm.tokenizer import Tokenizer, format_chat, load_tokenizer


@dataclass
class StageResult:
    row: dict  # the summary row: optimised, metric, before, after, tokens_per_s, ...
    artefacts: dict = field(default_factory=dict)  # name -> path (a model folder, an adapter, a file)
    extra: dict = field(default_factory=dict)  # stage-specific tables (the PEFT comparison, samples)


@dataclass
class Stage:
    name: str
    run: Callable  # (ctx) -> StageResult
    needs: tuple = ()  # stages whose artefacts it reads
    what: str = ""  # one line for the progress output and the report


# --------------------------------------------------------------------------- sizes

SIZES = {
    # --quick: the end-to-end test's run (a few minutes on one CPU thread)
    "quick": dict(vocab=600, seq_len=64, batch=8, pretrain_steps=150, mlm_steps=100, sft_steps=80, peft_steps=60,
                  eval_batches=4, max_length=96, sample_tokens=16, lr=3e-3, sft_lr=1e-3, peft_lr=5e-3,
                  head_steps=60, head_batch=16, head_max_length=64, head_lr=1e-3, entity_lr=5e-3,
                  reward_steps=80, reward_lr=1e-3, dpo_steps=40, dpo_lr=1e-4, dpo_beta=0.1, pref_batch=8,
                  rl_steps=40, rl_batch=16, rl_tokens=16, rl_temperature=1.0, rl_eval_prompts=64, rl_eval_samples=4,
                  ppo_lr=3e-4, ppo_kl_coef=0.2, ppo_epochs=2, grpo_lr=2e-4, grpo_beta=0.04, grpo_generations=4,
                  grpo_prompts=8,
                  decoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2),
                  encoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    # the default: small models that learn visibly within the 15-minute budget on 2 CPU cores
    "default": dict(vocab=2000, seq_len=128, batch=16, pretrain_steps=300, mlm_steps=150, sft_steps=150,
                    peft_steps=80, eval_batches=8, max_length=160, sample_tokens=40, lr=2e-3, sft_lr=5e-4,
                    peft_lr=3e-3, head_steps=100, head_batch=16, head_max_length=128, head_lr=1e-3, entity_lr=3e-3,
                    reward_steps=100, reward_lr=3e-4, dpo_steps=60, dpo_lr=5e-5, dpo_beta=0.1, pref_batch=8,
                    rl_steps=30, rl_batch=16, rl_tokens=32, rl_temperature=1.0, rl_eval_prompts=64,
                    rl_eval_samples=4, ppo_lr=1e-4, ppo_kl_coef=0.1, ppo_epochs=2, grpo_lr=1e-4, grpo_beta=0.04,
                    grpo_generations=4, grpo_prompts=8,
                    decoder=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2),
                    encoder=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4)),
}

SAMPLE_PROMPTS = ("What is AI?", "Who are you?", "Tell me a joke.")


# --------------------------------------------------------------------------- helpers

def _train_config(cls, ctx, stage: str, **fields):
    """A Pretrain/SFT config writing under ctx.out/stage, resuming there, on ctx.device."""
    s = ctx.sizes
    base = dict(output_dir=str(ctx.out / stage), device=ctx.device, batch_size=s["batch"],
                eval_batches=s["eval_batches"], eval_fraction=0.05, warmup_steps=5, save_every=20, keep_last=1,
                resume="auto", progress=ctx.progress, plot=True, seed=ctx.seed, log_every=1)
    base.update(fields)
    return cls(**base)


def _before_eval(cfg, model, tokenizer, objective: str, records=None) -> float:
    """Held-out loss of `model` before training, on the exact eval batches the trainer uses."""
    from fastllm.train import build
    from fastllm.train.common import CausalLMLoss, MaskedLMLoss, evaluate, resolve_device, resolve_dtype
    from fastllm.train.distributed import DistInfo

    info = DistInfo()
    device = resolve_device(cfg.device)
    if objective == "sft":
        _, held = build.sft_datasets(cfg, tokenizer, records)
        collate = build.pack_examples if cfg.packing else build.pad_examples(tokenizer.pad_id)
        batches = build.eval_batches(held, cfg.batch_size, cfg.eval_batches, info, collate)
    else:
        _, held = build.pretrain_datasets(cfg, tokenizer, model.config.vocab_size)
        batches = build.eval_batches(held, cfg.batch_size, cfg.eval_batches, info)
    loss = MaskedLMLoss(model) if objective == "mlm" else CausalLMLoss(model)
    model.to(device).eval()
    with torch.no_grad():
        out = evaluate(lambda batch: loss(**batch), batches, device=device, dtype=resolve_dtype(cfg.dtype, device))
    model.train()
    return out["eval_loss"]


def _tokens_per_s(output_dir: str | Path) -> float | None:
    """Training throughput of a run from its metrics.jsonl: all tokens / all step time."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps: dict[int, tuple[float, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("tokens") and rec.get("tokens_per_s"):
            steps[rec["step"]] = (rec["tokens"], rec["tokens"] / rec["tokens_per_s"])
    seconds = sum(t for _, t in steps.values())
    return sum(n for n, _ in steps.values()) / seconds if seconds > 0 else None


def _loss_row(ctx, optimised: str, result: dict, before: float, n_params: int, trainable: int,
              vocab_size: int) -> dict:
    """A loss row; its chance level is a uniform guess over the vocabulary, ln(vocab_size) nats."""
    after = result.get("eval_loss")
    return {"optimised": optimised, "metric": "eval loss (ppl)", "before": before, "after": after,
            "before_text": f"{before:.3f} ({math.exp(min(before, 50)):.1f})",
            "after_text": f"{after:.3f} ({math.exp(min(after, 50)):.1f})" if after is not None else "-",
            "chance": math.log(vocab_size), "chance_text": f"{math.log(vocab_size):.3f} (uniform)",
            "improved": after is not None and after < before, "steps": result.get("step"),
            "tokens_per_s": _tokens_per_s(result["output_dir"]), "params": n_params, "trainable_params": trainable,
            "loss_curve": result.get("loss_curve")}


def _samples(ctx, model, tokenizer) -> list[dict]:
    """Greedy completions of SAMPLE_PROMPTS (chat template) by `model`."""
    from fastllm.generation import generate
    from fastllm.tokenizer import format_prompt

    prompts = [[tokenizer.bos_id] + tokenizer.encode(format_prompt(p)) for p in SAMPLE_PROMPTS]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = generate(model, prompts, ctx.sizes["sample_tokens"], temperature=0.0,
                       stop_token_ids=[tokenizer.eos_id], pad_token_id=tokenizer.pad_id,
                       generator=torch.Generator(device=device).manual_seed(ctx.seed))
    model.train()
    rows = []
    for b, prompt in enumerate(SAMPLE_PROMPTS):
        ids = out.tokens[b][out.response_mask[b]].tolist()
        rows.append({"prompt": prompt, "completion": tokenizer.decode(ids)})
    return rows


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- stages

def stage_tokenizer(ctx) -> StageResult:
    """A SentencePiece BPE tokenizer on Shakespeare + Botchan + the instructions (chat template)."""
    corpora = {name: load_corpus(name) for name in ("shakespeare", "botchan")}
    data_dir = ctx.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, docs in corpora.items():  # one file per document: pretraining keeps document boundaries
        for i, doc in enumerate(docs):
            path = data_dir / f"{name}_{i:02d}.txt"
            path.write_text(doc, encoding="utf-8")
            files.append(str(path))
    chats = [format_chat(r)[1] for r in load_instructions()]
    texts = [d for docs in corpora.values() for d in docs] + chats
    tok = Tokenizer.train(texts, vocab_size=ctx.sizes["vocab"], model_type="bpe")
    path = ctx.out / "tokenizer"
    tok.save(path)
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return StageResult(
        row={"optimised": "BPE merges (SentencePiece)", "metric": "bytes per token",
             "before": 1.0, "after": n_bytes / n_tokens, "before_text": "1.00 (bytes)",
             "after_text": f"{n_bytes / n_tokens:.2f} ({n_chars / n_tokens:.2f} chars)",
             "improved": n_tokens < n_bytes, "vocab_size": tok.vocab_size},
        artefacts={"tokenizer": str(path), "pretrain_files": files})


def stage_pretrain(ctx) -> StageResult:
    """Causal-LM pre-training of a small Llama-style decoder on Shakespeare + Botchan."""
    from fastllm.train import PretrainConfig, pretrain

    s = ctx.sizes
    tok = load_tokenizer(ctx.artefacts["tokenizer"]["tokenizer"])
    # room for the virtual tokens of prompt tuning beyond the longest SFT example
    overrides = dict(s["decoder"], max_position_embeddings=max(s["seq_len"], s["max_length"]) + 16,
                     vocab_size=tok.vocab_size)
    cfg = _train_config(PretrainConfig, ctx, "pretrain", model="tiny-llama", model_overrides=overrides,
                        data=ctx.artefacts["tokenizer"]["pretrain_files"], seq_len=s["seq_len"],
                        max_steps=s["pretrain_steps"], lr=s["lr"], weight_decay=0.1)
    torch.manual_seed(ctx.seed)
    model = models.build_model(models.preset("tiny-llama", **overrides))
    before = _before_eval(cfg, model, tok, "causal")
    result = pretrain(cfg, model=model, tokenizer=tok)
    final = Path(result["output_dir"]) / "final"
    n = _n_params(model)
    return StageResult(row=_loss_row(ctx, "next-token cross-entropy", result, before, n, n, tok.vocab_size),
                       artefacts={"model": str(final)},
                       extra={"samples": _samples(ctx, models.from_pretrained(final).to(ctx.torch_device), tok)})


def stage_mlm(ctx) -> StageResult:
    """Masked-LM pre-training of a small BERT-style encoder on the same text."""
    from fastllm.train import PretrainConfig, pretrain

    s = ctx.sizes
    tok = load_tokenizer(ctx.artefacts["tokenizer"]["tokenizer"])
    overrides = dict(s["encoder"], max_position_embeddings=s["seq_len"], vocab_size=tok.vocab_size)
    cfg = _train_config(PretrainConfig, ctx, "mlm", model="tiny-bert", model_overrides=overrides, objective="mlm",
                        data=ctx.artefacts["tokenizer"]["pretrain_files"], seq_len=s["seq_len"],
                        max_steps=s["mlm_steps"], lr=s["lr"], weight_decay=0.01)
    torch.manual_seed(ctx.seed)
    model = models.build_model(models.preset("tiny-bert", **overrides))
    before = _before_eval(cfg, model, tok, "mlm")
    result = pretrain(cfg, model=model, tokenizer=tok)
    n = _n_params(model)
    return StageResult(row=_loss_row(ctx, "masked-token cross-entropy", result, before, n, n, tok.vocab_size),
                       artefacts={"model": str(Path(result["output_dir"]) / "final")})


def _base_model(ctx):
    """(model, tokenizer, where from) the fine-tuning stages start from: --model DIR, else the
    decoder pre-trained here."""
    path = ctx.model_dir or ctx.artefacts["pretrain"]["model"]
    return models.from_pretrained(path), load_tokenizer(path), path


def _sft_stage(ctx, name: str, what: str, **fields) -> StageResult:
    from fastllm.train import SFTConfig, sft

    s = ctx.sizes
    model, tok, base = _base_model(ctx)
    records = load_instructions()
    cfg = _train_config(SFTConfig, ctx, name, model=base, data="instructions", max_length=s["max_length"],
                        too_long="skip", max_steps=s["sft_steps"], lr=s["sft_lr"], weight_decay=0.0, **fields)
    before = _before_eval(cfg, model, tok, "sft", records)
    n = _n_params(model)
    result = sft(cfg, model=model, tokenizer=tok, records=records)
    row = _loss_row(ctx, what, result, before, n, result["trainable_params"], tok.vocab_size)
    final = Path(result["output_dir"]) / "final"
    extra = {}
    if name == "sft":
        extra["samples"] = _samples(ctx, models.from_pretrained(final).to(ctx.torch_device), tok)
    return StageResult(row=row, artefacts={"model": str(final)}, extra=extra)


def stage_sft(ctx) -> StageResult:
    """Supervised fine-tuning of the whole decoder on the instructions (responses only)."""
    return _sft_stage(ctx, "sft", "response cross-entropy, all weights")


def stage_sft_layers(ctx) -> StageResult:
    """The same SFT training only the last decoder layer (everything else frozen)."""
    n_layers = models.from_pretrained(ctx.model_dir or ctx.artefacts["pretrain"]["model"]).config.num_hidden_layers
    return _sft_stage(ctx, "sft_layers", f"response cross-entropy, layer {n_layers - 1} only",
                      train_layers=f"{n_layers - 1}:{n_layers}")


PEFT_METHODS = {  # module swaps through SFTConfig.peft; the wrappers (prefix, prompt) wrap the model here
    "lora": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "adapters": {"method": "adapters", "kind": "houlsby", "reduction_factor": 4},
    "prefix": {"num_virtual_tokens": 8},
    "prompt": {"num_virtual_tokens": 8},
}


_WRAPPERS = {"prefix": PrefixTuningModel, "prompt": PromptTuningModel}  # SFT exports their adapters alone


def stage_peft(ctx) -> StageResult:
    """LoRA, bottleneck adapters, prefix tuning and prompt tuning side by side, each from the
    same base on the same SFT data and steps: trainable parameters, eval loss, time, memory."""
    from fastllm.train import SFTConfig, sft

    from .run import measure

    s = ctx.sizes
    records = load_instructions()
    table, artefacts = [], {}
    for label, spec in PEFT_METHODS.items():
        model, tok, base = _base_model(ctx)
        n = _n_params(model)
        wrapper = _WRAPPERS.get(label)
        if wrapper is not None:
            model = wrapper(model, **spec)
        cfg = _train_config(SFTConfig, ctx, f"peft/{label}", model=base, data="instructions",
                            max_length=s["max_length"], too_long="skip", max_steps=s["peft_steps"],
                            lr=s["peft_lr"], weight_decay=0.0, peft=None if wrapper else dict(spec),
                            packing=wrapper is None)  # virtual tokens need padded rows, not packed ones
        before = _before_eval(cfg, model, tok, "sft", records)
        with measure(ctx.torch_device) as m:
            result = sft(cfg, model=model, tokenizer=tok, records=records)
        row = _loss_row(ctx, label, result, before, n, result["trainable_params"], tok.vocab_size)
        row.update(method=label, wall_s=m.wall_s, peak_mem_mb=m.peak_mb)
        table.append(row)
        artefacts[label] = str(Path(result["output_dir"]) / "final")
    best = min(table, key=lambda r: r["after"])
    return StageResult(
        row={"optimised": "response cross-entropy, adapters only", "metric": "eval loss (best method)",
             "before": best["before"], "after": best["after"],
             "before_text": table[0]["before_text"], "after_text": f"{best['after_text']} {best['method']}",
             "chance": table[0]["chance"], "chance_text": table[0]["chance_text"],
             "improved": all(r["improved"] for r in table),
             "tokens_per_s": sum(r["tokens_per_s"] or 0 for r in table) / len(table),
             "trainable_params": {r["method"]: r["trainable_params"] for r in table},
             "loss_curve": [r["loss_curve"] for r in table if r.get("loss_curve")]},
        artefacts=artefacts, extra={"peft": table})


# --------------------------------------------------------------------------- task heads

# (label, task, shipped set, trunk stage, what the loss is). The decoder heads start from the
# pre-trained decoder (or --model), the tagger from the masked-LM encoder.
HEADS = (("topics", "classification", "topics", "pretrain", "cross-entropy over the topics"),
         ("sentiment", "regression", "sentiment", "pretrain", "squared error (standardised targets)"),
         ("entities", "token_classification", "entities", "mlm", "per-word BIO tag cross-entropy"))
HEAD_METRICS = {"classification": ("accuracy", "macro_f1"), "regression": ("pearson", "mse"),
                "token_classification": ("f1", "tag_accuracy")}
HEAD_METRIC_NAMES = {"classification": "accuracy / macro-F1", "regression": "Pearson r / MSE",
                     "token_classification": "entity F1 / tag accuracy"}


def _head_setup(cfg, tok):
    """What `finetune` builds before training, built the same way: the records, the held-out
    split, the fresh head on the trunk, and the exact held-out batches it evaluates on."""
    from fastllm.data import TaskDataset, load_task_data, train_test_split
    from fastllm.train import build
    from fastllm.train.distributed import DistInfo

    ft = importlib.import_module("fastllm.train.finetune")  # the package's `finetune` is the function

    data = load_task_data(cfg.data, cfg.task)
    indices, held = train_test_split(list(range(len(data.records))), cfg.eval_fraction, seed=cfg.seed)
    head = ft._make_head(cfg, data, [data.records[i] for i in indices], tok.pad_id)
    torch.manual_seed(cfg.seed)
    model = build.get_head_model(cfg, ft.HEAD_KIND[cfg.task], head, tok.vocab_size, cfg.max_length)

    def dataset(idx):
        return TaskDataset([data.records[i] for i in idx], tok, cfg.task, cfg.max_length,
                           wheres=[data.wheres[i] for i in idx])
    train_set, held_set = dataset(indices), dataset(held)
    batches = build.eval_batches(held_set, cfg.batch_size, cfg.eval_batches, DistInfo(), train_set.collate)
    return data, model, train_set, batches


def _head_scores(cfg, model, data, batches) -> dict:
    """The held-out metrics `finetune` reports, of `model` as it is (here: the untrained head)."""
    from fastllm.train.common import autocast, resolve_device, resolve_dtype

    ft = importlib.import_module("fastllm.train.finetune")  # the package's `finetune` is the function

    device = resolve_device(cfg.device)
    model.to(device).eval()
    preds, golds = [], []
    with torch.no_grad():
        for batch in batches:
            with autocast(device, resolve_dtype(cfg.dtype, device)):
                pred = model.predict(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            p, g = ft._predictions(cfg.task, pred.cpu(), batch["labels"])
            preds += p
            golds += g
    model.train()
    return ft._metrics(cfg.task, preds, golds, data.label_names)


def _head_chance(task: str, model, batches) -> tuple[dict, str]:
    """What a guess without the text scores on the held-out batches: always the most frequent
    class (classification); always the training targets' mean (regression: Pearson 0, the MSE
    of that constant); every word O (entities: F1 0)."""
    from fastllm.train.metrics import classification_metrics

    gold = [y for b in batches for y in b["labels"].tolist()]
    if task == "classification":
        majority = max(set(gold), key=gold.count)
        m = classification_metrics([majority] * len(gold), gold)
        return m, f"{m['accuracy']:.2f} / {m['macro_f1']:.2f} (majority class)"
    if task == "regression":
        mean = model.head.output_shift or 0.0  # standardised training: the training targets' mean
        mse = sum((y - mean) ** 2 for y in gold) / len(gold)
        return {"pearson": 0.0, "mse": mse}, f"0.00 / {mse:.3f} (training mean)"
    return {"f1": 0.0}, "0.00 (all O)"


def _head_verdict(task: str, before: dict, after: dict, chance: dict) -> dict:
    """improved: what the head optimised moved the right way (regression: the MSE fell; else the
    first score rose); beats_chance: its score is past the guess (regression: Pearson above 0
    and MSE below the training mean's)."""
    if task == "regression":
        return {"improved": after["mse"] < before["mse"],
                "beats_chance": after["pearson"] > 0 and after["mse"] < chance["mse"]}
    key = HEAD_METRICS[task][0]
    return {"improved": after[key] > before[key], "beats_chance": after[key] > chance[key]}


def _per_unit_tokens(train_set, task: str) -> float:
    """Real input tokens per unit `finetune`'s tokens/s counts: a sequence, or a tagged word."""
    from fastllm.labels import IGNORE_INDEX

    tokens = sum(it["input_ids"].numel() for it in train_set.items)
    if task != "token_classification":
        return tokens / len(train_set.items)
    return tokens / sum(int((it["labels"] != IGNORE_INDEX).sum()) for it in train_set.items)


def _scores_text(task: str, m: dict) -> str:
    a, b = HEAD_METRICS[task]
    return f"{m[a]:.2f} / {m[b]:.2f}" if task != "regression" else f"{m[a]:.2f} / {m[b]:.3f}"


def stage_heads(ctx) -> StageResult:
    """Three task heads on the pre-trained trunks: topic classification and sentiment regression
    on the decoder, named-entity tagging on the encoder (all weights trained)."""
    from fastllm.train import FinetuneConfig, finetune

    from .run import measure

    s = ctx.sizes
    rows, artefacts = [], {}
    for label, task, data_name, trunk, optimised in HEADS:
        base = ctx.model_dir if trunk == "pretrain" and ctx.model_dir else ctx.artefacts[trunk]["model"]
        tok = load_tokenizer(base)
        cfg = _train_config(FinetuneConfig, ctx, f"heads/{label}", model=base, task=task, data=data_name,
                            batch_size=s["head_batch"], max_length=s["head_max_length"], max_steps=s["head_steps"],
                            lr=s["entity_lr"] if task == "token_classification" else s["head_lr"],
                            weight_decay=0.0, eval_fraction=0.2, eval_batches=1000)  # all held-out records
        data, model, train_set, batches = _head_setup(cfg, tok)
        chance, chance_text = _head_chance(task, model, batches)
        before = _head_scores(cfg, model, data, batches)
        with measure(ctx.torch_device) as m:
            result = finetune(cfg, model=model, tokenizer=tok)
        after = {k[len("eval_"):]: v for k, v in result.items() if k.startswith("eval_")}
        key = HEAD_METRICS[task][0]
        units_per_s = _tokens_per_s(result["output_dir"])
        rows.append({
            "head": label, "task": task, "data": data_name, "trunk": trunk,
            "optimised": f"{optimised}, all weights", "metric": HEAD_METRIC_NAMES[task], "key": key,
            "before": before[key], "after": after[key], "chance": chance[key],
            "before_scores": before, "after_scores": after, "chance_scores": chance,
            "before_text": _scores_text(task, before), "after_text": _scores_text(task, after),
            "chance_text": chance_text, **_head_verdict(task, before, after, chance), "steps": result["step"],
            "tokens_per_s": units_per_s * _per_unit_tokens(train_set, task) if units_per_s else None,
            "params": _n_params(model), "trainable_params": result["trainable_params"],
            "eval_records": sum(len(b["labels"]) for b in batches), "wall_s": m.wall_s, "peak_mem_mb": m.peak_mb,
            "loss_curve": result.get("loss_curve")})
        artefacts[label] = str(Path(result["output_dir"]) / "final")
    return StageResult(
        row={"optimised": "task losses, all weights", "metric": "held-out score (see rows)",
             "before": None, "after": None, "before_text": "-", "after_text": "-",
             "improved": all(r["improved"] and r["beats_chance"] for r in rows), "rows": rows,
             "tokens_per_s": sum(r["tokens_per_s"] or 0 for r in rows) / len(rows),
             "trainable_params": {r["head"]: r["trainable_params"] for r in rows},
             "loss_curve": [r["loss_curve"] for r in rows if r.get("loss_curve")]},
        artefacts=artefacts)


# --------------------------------------------------------------------------- preference stages

def _sft_export(ctx) -> str:
    return ctx.artefacts["sft"]["model"]


def _pref_config(cls, ctx, stage: str, **fields):
    s = ctx.sizes
    return _train_config(cls, ctx, stage, model=_sft_export(ctx), data="preferences", batch_size=s["pref_batch"],
                         max_length=s["max_length"], too_long="skip", weight_decay=0.0,
                         eval_batches=1000, **fields)  # every held-out pair (5%)


def stage_reward(ctx) -> StageResult:
    """A reward model: the SFT decoder with a scalar head, Bradley-Terry loss on the shipped
    preference pairs (all weights)."""
    from fastllm.rl import bradley_terry_loss
    from fastllm.train import RewardConfig, build, reward
    from fastllm.train.distributed import DistInfo

    reward_mod = importlib.import_module("fastllm.train.reward")  # the package's `reward` is the function
    s = ctx.sizes
    cfg = _pref_config(RewardConfig, ctx, "reward", max_steps=s["reward_steps"], lr=s["reward_lr"])
    tok = load_tokenizer(cfg.model)
    records = build.read_records(cfg.data, kind="preference")
    torch.manual_seed(ctx.seed)
    model = build.get_reward_model(cfg, tok)
    # before: the fresh head on the exact held-out pairs the trainer evaluates on
    _, held = reward_mod.reward_datasets(cfg, tok, records)
    batches = build.eval_batches(held, cfg.batch_size, cfg.eval_batches, DistInfo(), reward_mod.collate_pairs)
    def score(batch, P):
        r = reward_mod.PackedRewards(model)(**reward_mod.model_inputs(batch)).float()
        d = r[:P] - r[P:]
        return (d > 0).sum(), d.sum(), bradley_terry_loss(r[:P], r[P:]).sum()

    before, n = _pair_scores(model, batches, cfg, score)
    result = reward(cfg, model=model, tokenizer=tok, records=records)
    after = {"accuracy": result["eval_accuracy"], "margin": result["eval_margin"], "loss": result["eval_loss"]}
    return StageResult(
        row={"optimised": "Bradley-Terry loss on preference pairs, all weights",
             "metric": "held-out pair accuracy (loss)", "before": before["accuracy"], "after": after["accuracy"],
             "before_text": f"{before['accuracy']:.2f} ({before['loss']:.3f})",
             "after_text": f"{after['accuracy']:.2f} ({after['loss']:.3f})",
             "chance": 0.5, "chance_text": f"0.50 ({math.log(2):.3f})",
             "improved": after["accuracy"] > before["accuracy"] and after["accuracy"] > 0.5,
             "before_scores": before, "after_scores": after, "eval_pairs": int(n), "steps": result["step"],
             "tokens_per_s": _tokens_per_s(result["output_dir"]), "params": _n_params(model),
             "trainable_params": result["trainable_params"], "loss_curve": result.get("loss_curve"),
             "reward_mean": result.get("reward_mean"), "reward_std": result.get("reward_std")},
        artefacts={"model": str(Path(result["output_dir"]) / "final")})


def _pair_scores(model, batches, cfg, score) -> tuple[dict, int]:
    """A preference stage's "before" numbers on the held-out pairs the trainer evaluates on:
    score(batch, P) -> (correct pairs, summed margin, summed loss) for the P pairs of a batch,
    run without gradients in eval mode on cfg's device and dtype. Returns ({"accuracy",
    "margin", "loss"} per pair, pairs)."""
    from fastllm.train import build
    from fastllm.train.common import autocast, resolve_device, resolve_dtype, to_device

    device = resolve_device(cfg.device)
    model.to(device).eval()
    n = 0
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            P = build.count_pairs(batch)
            with autocast(device, resolve_dtype(cfg.dtype, device)):
                sums += torch.stack([t.detach().double().cpu() for t in score(batch, P)])
            n += P
    model.train()
    correct, margin, loss = sums.tolist()
    return {"accuracy": correct / n, "margin": margin / n, "loss": loss / n}, n


def stage_dpo(ctx) -> StageResult:
    """DPO of the SFT decoder on the preference pairs, the reference (the SFT model itself)
    precomputed once."""
    from fastllm.rl import dpo_loss
    from fastllm.train import DPOConfig, build, dpo
    from fastllm.train.distributed import DistInfo
    from fastllm.train.dpo import SequenceLogProbs, model_inputs

    s = ctx.sizes
    cfg = _pref_config(DPOConfig, ctx, "dpo", max_steps=s["dpo_steps"], lr=s["dpo_lr"], beta=s["dpo_beta"],
                       reference="precomputed")
    tok = load_tokenizer(cfg.model)
    records = build.read_records(cfg.data, kind="preference")
    model = models.from_pretrained(cfg.model)
    # before: the held-out DPO evaluation at step 0, where the policy is the reference (in eval
    # mode, as the trainer precomputes it): every implicit reward is 0
    _, held = build.preference_datasets(cfg, tok, records)
    batches = build.eval_batches(held, cfg.batch_size, cfg.eval_batches, DistInfo(), build.pack_pairs)
    def score(batch, P):
        logps = SequenceLogProbs(model)(**model_inputs(batch)).float()
        res = dpo_loss(logps[:P], logps[P:], logps[:P], logps[P:], beta=cfg.beta)
        return res.accuracy.sum(), res.margin.sum(), res.losses.sum()

    before, n = _pair_scores(model, batches, cfg, score)
    result = dpo(cfg, model=model, tokenizer=tok, records=records)
    after = {"accuracy": result["eval_accuracy"], "margin": result["eval_margin"], "loss": result["eval_loss"]}
    final = Path(result["output_dir"]) / "final"
    return StageResult(
        row={"optimised": f"DPO loss (beta {cfg.beta}), all weights",
             "metric": "held-out pref. accuracy / margin", "before": before["accuracy"], "after": after["accuracy"],
             "before_text": f"{before['accuracy']:.2f} / {before['margin']:.3f}",
             "after_text": f"{after['accuracy']:.2f} / {after['margin']:.3f}",
             "chance": 0.5, "chance_text": "0.50 / 0 (coin flip)",
             "improved": after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"],
             "before_scores": before, "after_scores": after, "eval_pairs": int(n), "steps": result["step"],
             "tokens_per_s": _tokens_per_s(result["output_dir"]), "params": _n_params(model),
             "trainable_params": result["trainable_params"], "loss_curve": result.get("loss_curve")},
        artefacts={"model": str(final)},
        extra={"samples": _samples(ctx, models.from_pretrained(final).to(ctx.torch_device), tok)})


# --------------------------------------------------------------------------- on-policy RL stages

def _rl_prompts(ctx) -> tuple[list[str], list[str]]:
    """(training questions, evaluation questions): the shipped instructions' distinct prompts,
    split once (seed), the evaluation ones never rolled out in training."""
    from fastllm.data import train_test_split

    questions = sorted({r["prompt"] for r in load_instructions()})
    train, held = train_test_split(questions, 0.1, seed=ctx.seed)
    return train, held[:ctx.sizes["rl_eval_prompts"]]


@torch.no_grad()
def _rl_eval(ctx, policy, reference, reward_model, tok, questions: list[str], cfg) -> dict:
    """Mean reward and KL to `reference` of `policy`'s rollouts on `questions`: rl_eval_samples
    samples each with the trainer's sampling settings (temperature, length, no_eos_score) from a
    fixed generator, so "before" and "after" draw with the same random numbers; scored by the
    same reward model. KL: per sequence, the sum over response tokens of the k3 estimate (an
    unbiased, non-negative estimate of KL(policy || reference) from samples of the policy)."""
    from fastllm.data import PromptDataset
    from fastllm.rl import kl_estimate
    from fastllm.train.rollout import policy_logprobs, response_batch, sample_responses, score_responses, to_response

    device = ctx.torch_device
    N = cfg.max_new_tokens
    items = PromptDataset(questions, tok, cfg.max_prompt_length, skip_too_long=True).examples
    policy.to(device).eval()
    reference.to(device).eval()
    reward_model.to(device).eval()
    out = sample_responses(policy, items, max_new_tokens=N, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           generator=torch.Generator(device=device).manual_seed(ctx.seed + 1),
                           num_samples=ctx.sizes["rl_eval_samples"])
    batch = response_batch(out, N)
    scores, eos = score_responses(batch, reward_model=reward_model, eos_id=tok.eos_id, no_eos_score=cfg.no_eos_score)
    logp = to_response(policy_logprobs(policy, batch, cfg.temperature)[0], batch.starts, N)
    ref_logp = to_response(policy_logprobs(reference, batch, cfg.temperature)[0], batch.starts, N)
    kl = (kl_estimate(logp, ref_logp, "k3") * batch.mask).sum(1)
    return {"reward": float(scores.mean()), "reward_sd": float(scores.std()), "kl": float(kl.mean()),
            "eos_share": float(eos.float().mean()), "response_length": float(batch.response_lengths.float().mean()),
            "rollouts": int(scores.numel())}


def _rl_row(ctx, optimised: str, before: dict, after: dict, result: dict, n_params: int, curves) -> dict:
    return {"optimised": optimised, "metric": "mean reward (RM score, normalised)",
            "before": before["reward"], "after": after["reward"],
            "before_text": f"{before['reward']:.3f}", "after_text": f"{after['reward']:.3f}",
            "chance": 0.0, "chance_text": "0.000 (a pair's average)",
            "kl": after["kl"], "kl_text": f"{after['kl']:.3f}",
            "improved": after["reward"] > before["reward"], "before_scores": before, "after_scores": after,
            "steps": result.get("step"), "tokens_per_s": _tokens_per_s(result["output_dir"]), "params": n_params,
            "trainable_params": result["trainable_params"], "loss_curve": result.get("loss_curve"), "rl_curves": curves}


def _rl_config(cls, ctx, stage: str, **fields):
    s = ctx.sizes
    base = dict(model=_sft_export(ctx), reward_model=ctx.artefacts["reward"]["model"], data="instructions",
                batch_size=s["rl_batch"], max_prompt_length=s["max_length"], max_new_tokens=s["rl_tokens"],
                temperature=s["rl_temperature"], no_eos_score=None, max_steps=s["rl_steps"], save_every=10,
                eval_batches=0)
    return _train_config(cls, ctx, stage, **{**base, **fields})


def _rl_stage(ctx, cfg, train, optimised: str, curves) -> StageResult:
    """An RL stage (PPO, GRPO) on the SFT decoder against the reward stage's reward model: the
    held-out reward and KL before (the reference is the policy) and after `train(cfg, ...)`,
    its reward/KL curves (`curves(result)`), samples of the final policy."""
    tok = load_tokenizer(cfg.model)
    train_q, eval_q = _rl_prompts(ctx)
    reference, rm = models.from_pretrained(cfg.model), models.from_pretrained(cfg.reward_model)
    before = _rl_eval(ctx, reference, reference, rm, tok, eval_q, cfg)
    result = train(cfg, model=models.from_pretrained(cfg.model), tokenizer=tok, prompts=train_q, reward_model=rm)
    final = Path(result["output_dir"]) / "final"
    policy = models.from_pretrained(final)
    after = _rl_eval(ctx, policy, reference, rm, tok, eval_q, cfg)
    return StageResult(
        row=_rl_row(ctx, optimised, before, after, result, _n_params(policy), curves(result)),
        artefacts={"model": str(final)}, extra={"samples": _samples(ctx, policy.to(ctx.torch_device), tok)})


def stage_ppo(ctx) -> StageResult:
    """PPO of the SFT decoder against the reward stage's reward model on the instruction prompts
    (chat template), a separate critic initialised from the reward model, KL to the SFT model
    in the per-token reward."""
    from fastllm.train import PPOConfig, ppo

    s = ctx.sizes
    cfg = _rl_config(PPOConfig, ctx, "ppo", lr=s["ppo_lr"], kl_coef=s["ppo_kl_coef"], ppo_epochs=s["ppo_epochs"],
                     num_minibatches=2)
    return _rl_stage(ctx, cfg, ppo, f"PPO (clip {cfg.clip_eps}, KL coef {cfg.kl_coef}), all weights + critic",
                     lambda result: result.get("ppo_curves"))


def stage_grpo(ctx) -> StageResult:
    """GRPO of the SFT decoder: G samples per prompt, group-relative advantages, no critic,
    reward = the reward stage's reward model, k3 KL to the SFT model as a loss term."""
    from fastllm.train import GRPOConfig, grpo

    s = ctx.sizes
    cfg = _rl_config(GRPOConfig, ctx, "grpo", lr=s["grpo_lr"], beta=s["grpo_beta"],
                     num_generations=s["grpo_generations"], batch_size=s["grpo_prompts"])
    return _rl_stage(ctx, cfg, grpo, f"GRPO (G {cfg.num_generations}, beta {cfg.beta}), all weights",
                     lambda result: _rl_curves(result["output_dir"], "grpo"))


def _rl_curves(output_dir: str, name: str) -> str | None:
    """reward/mean and kl of a GRPO run as PNG (PPO writes its own ppo_curves.png)."""
    from fastllm.train.ppo import plot_ppo_curves

    try:
        return str(plot_ppo_curves(Path(output_dir) / "metrics.jsonl", Path(output_dir) / f"{name}_curves.png"))
    except ImportError:
        return None


STAGES = [
    Stage("tokenizer", stage_tokenizer, (), "SentencePiece BPE on Shakespeare + Botchan + instructions"),
    Stage("pretrain", stage_pretrain, ("tokenizer",), "causal-LM pre-training of a small decoder"),
    Stage("mlm", stage_mlm, ("tokenizer",), "masked-LM pre-training of a small encoder"),
    Stage("sft", stage_sft, ("pretrain",), "SFT on the instructions, all weights"),
    Stage("sft_layers", stage_sft_layers, ("pretrain",), "SFT on the instructions, last layer only"),
    Stage("peft", stage_peft, ("pretrain",), "LoRA / adapters / prefix / prompt tuning side by side"),
    Stage("heads", stage_heads, ("pretrain", "mlm"), "task heads: topics, sentiment, entities"),
    Stage("reward", stage_reward, ("sft",), "reward model on the preference pairs"),
    Stage("ppo", stage_ppo, ("sft", "reward"), "PPO against the reward model, KL to the SFT model"),
    Stage("dpo", stage_dpo, ("sft",), "DPO on the preference pairs, reference precomputed"),
    Stage("grpo", stage_grpo, ("sft", "reward"), "GRPO against the reward model, G samples per prompt"),
]

