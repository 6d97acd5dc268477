"""Supervised fine-tuning on chat examples, full model, selected layers or PEFT adapters.

    from fastllm.train import SFTConfig, sft
    sft(SFTConfig(model="path/to/hf_model", train_layers="20:30", max_steps=500))
    sft(SFTConfig(model="path/to/hf_model", peft={"method": "lora", "r": 8, "alpha": 16}))

Each example is the chat template rendered (fastllm.tokenizer.format_chat), prompt labels
-100 so only the response is trained on. With packing (default) a batch is one row of
concatenated examples whose attention stays inside each example (cu_seqlens, positions
restarting at 0); without it, rows are right-padded and masked.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastllm.data import BatchLoader

from . import build
from .checkpoint import latest_checkpoint, resume_training_state, save_training_state
from .common import (
    CausalLMLoss,
    build_optimizer,
    build_scheduler,
    enable_activation_checkpointing,
    evaluate,
    freeze_parameters,
    optimizer_step,
    resolve_device,
    resolve_dtype,
    seed_everything,
    transformer_layers,
)
from .config import SFTConfig, as_config, save_config
from .distributed import init_distributed, no_sync_fn, wrap_model
from .export import export_final
from .logging import MetricsLogger, ProgressBar, plot_loss_curve
from .peft_glue import apply_peft


def sft(config: SFTConfig | str | dict | None = None, *, model=None, tokenizer=None, records=None) -> dict:
    """Run SFT; returns {"step", "loss", "eval_loss", "eval_ppl", "trainable_params", ...}.

    config: an SFTConfig, a YAML path or a dict of fields. model / tokenizer / records:
    optional ready objects instead of what the config names."""
    cfg = as_config(SFTConfig, config)
    # ---- setup: devices, tokenizer, model, data
    info, device = init_distributed(cfg.distributed, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    records = build.read_records(cfg.data) if records is None else records
    if not records:
        raise ValueError("data: empty dataset (no records)")
    if tokenizer is None:
        tokenizer = build.get_tokenizer(cfg, info, lambda: build.chat_texts(records, cfg.system))
    if model is None:
        model = build.get_model(cfg, tokenizer.vocab_size, cfg.max_length)
    build.check_fit(model, tokenizer.vocab_size, cfg.max_length)
    train_set, eval_set = build.sft_datasets(cfg, tokenizer, records)
    collate = build.pack_examples if cfg.packing else build.pad_examples(tokenizer.pad_id)
    loader = BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loader.collate_fn = collate
    eval_data = build.eval_batches(eval_set, cfg.batch_size, cfg.eval_batches, info, collate)

    if cfg.peft:
        model = apply_peft(model, cfg.peft)
    n_trainable = freeze_parameters(model, cfg.freeze, cfg.train_layers)
    model.to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    wrapped = wrap_model(CausalLMLoss(model), info, transformer_layers(model), device)
    optimizer = build_optimizer(wrapped, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    adapters_only = bool(cfg.peft)

    def loss_sum(batch):
        return wrapped(**batch)

    def run_eval():
        wrapped.eval()
        result = evaluate(loss_sum, eval_data, device=device, dtype=dtype, world_size=info.world_size)
        wrapped.train()
        return result

    # ---- train
    logger = MetricsLogger(out, enabled=info.is_main)
    bar = ProgressBar(cfg.max_steps, step, enabled=info.is_main and cfg.progress)
    wrapped.train()
    last = {"step": step}
    while step < cfg.max_steps:
        micro = [loader.next_batch() for _ in range(cfg.grad_accum)]
        t0 = time.perf_counter()
        try:
            metrics = optimizer_step(micro, loss_sum, wrapped, optimizer, scheduler, device=device, dtype=dtype,
                                     max_grad_norm=cfg.max_grad_norm, world_size=info.world_size,
                                     no_sync=no_sync_fn(wrapped, info))
        except FloatingPointError as exc:
            bar.close()
            good = latest_checkpoint(out)
            raise FloatingPointError(f"{exc} at step {step + 1}: training stopped; last good checkpoint: "
                                     f"{good if good else 'none'}") from None
        step += 1
        metrics.update(step=step, tokens_per_s=metrics["tokens"] / (time.perf_counter() - t0))
        bar.update(step, metrics["loss"], metrics["tokens"])
        if eval_data and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics.update(run_eval())
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logger.log(metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info, trainable_only=adapters_only)
        last = metrics
    bar.close()

    # ---- finish: last evaluation, checkpoint, exported model or adapters, loss curve
    result = {"step": step, "loss": last.get("loss"), "trainable_params": n_trainable, "output_dir": str(out)}
    if eval_data:
        result.update(run_eval())
        logger.log({"step": step, **{k: v for k, v in result.items() if k.startswith("eval_")}})
    save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info, trainable_only=adapters_only)
    export_final(model, wrapped, tokenizer, out / "final", info, adapters_only=adapters_only)
    if info.is_main and cfg.plot:
        try:
            result["loss_curve"] = str(plot_loss_curve(out / "metrics.jsonl"))
        except ImportError:
            pass
    return result
