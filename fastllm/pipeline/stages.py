"""The pipeline's stages: each a plain function `stage(ctx) -> StageResult` that trains (or
builds) one thing from what earlier stages left in ctx.artefacts, and returns its summary row
and the paths of what it exported. Adding a method to the pipeline is one more function here
and one more entry in `STAGES`.

Every stage writes under ctx.out / <stage name>, a folder that does not change between runs,
so a stage killed half-way resumes through its trainer's own checkpoints (`resume="auto"`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastllm import models
from fastllm.data import load_corpus, load_instructions
from fastllm.peft import PrefixTuningModel, PromptTuningModel, save_adapter
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
    "quick": dict(vocab=600, seq_len=64, batch=8, pretrain_steps=60, mlm_steps=60, sft_steps=40, peft_steps=40,
                  eval_batches=4, max_length=96, sample_tokens=16, lr=3e-3, sft_lr=1e-3, peft_lr=5e-3,
                  decoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2),
                  encoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    # the default: small models that learn visibly within the 15-minute budget on 2 CPU cores
    "default": dict(vocab=2000, seq_len=128, batch=16, pretrain_steps=300, mlm_steps=150, sft_steps=150,
                    peft_steps=80, eval_batches=8, max_length=160, sample_tokens=40, lr=2e-3, sft_lr=5e-4,
                    peft_lr=3e-3,
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


def _loss_row(ctx, optimised: str, result: dict, before: float, n_params: int, trainable: int) -> dict:
    import math

    after = result.get("eval_loss")
    return {"optimised": optimised, "metric": "eval loss (ppl)", "before": before, "after": after,
            "before_text": f"{before:.3f} ({math.exp(min(before, 50)):.1f})",
            "after_text": f"{after:.3f} ({math.exp(min(after, 50)):.1f})" if after is not None else "-",
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
    return StageResult(row=_loss_row(ctx, "next-token cross-entropy", result, before, n, n),
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
    return StageResult(row=_loss_row(ctx, "masked-token cross-entropy", result, before, n, n),
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
    row = _loss_row(ctx, what, result, before, n, result["trainable_params"])
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


class _ExportablePrefix(PrefixTuningModel):
    """Prefix tuning whose export (`export_final` calls save_pretrained) is the adapter alone."""

    def save_pretrained(self, path):
        save_adapter(self, path)


class _ExportablePrompt(PromptTuningModel):
    def save_pretrained(self, path):
        save_adapter(self, path)


_WRAPPERS = {"prefix": _ExportablePrefix, "prompt": _ExportablePrompt}


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
        row = _loss_row(ctx, label, result, before, n, result["trainable_params"])
        row.update(method=label, wall_s=m.wall_s, peak_mem_mb=m.peak_mb)
        table.append(row)
        artefacts[label] = str(Path(result["output_dir"]) / "final")
    best = min(table, key=lambda r: r["after"])
    return StageResult(
        row={"optimised": "response cross-entropy, adapters only", "metric": "eval loss (best method)",
             "before": best["before"], "after": best["after"],
             "before_text": table[0]["before_text"], "after_text": f"{best['after_text']} {best['method']}",
             "improved": all(r["improved"] for r in table),
             "tokens_per_s": sum(r["tokens_per_s"] or 0 for r in table) / len(table),
             "trainable_params": {r["method"]: r["trainable_params"] for r in table},
             "loss_curve": [r["loss_curve"] for r in table if r.get("loss_curve")]},
        artefacts=artefacts, extra={"peft": table})


STAGES = [
    Stage("tokenizer", stage_tokenizer, (), "SentencePiece BPE on Shakespeare + Botchan + instructions"),
    Stage("pretrain", stage_pretrain, ("tokenizer",), "causal-LM pre-training of a small decoder"),
    Stage("mlm", stage_mlm, ("tokenizer",), "masked-LM pre-training of a small encoder"),
    Stage("sft", stage_sft, ("pretrain",), "SFT on the instructions, all weights"),
    Stage("sft_layers", stage_sft_layers, ("pretrain",), "SFT on the instructions, last layer only"),
    Stage("peft", stage_peft, ("pretrain",), "LoRA / adapters / prefix / prompt tuning side by side"),
]

