"""Pre-training: causal LM (next token) or masked LM on packed blocks of a token stream.

    from fastllm.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))

One step: grad_accum micro-batches of batch_size blocks (per process), loss = summed
cross-entropy / the step's real token count, backward, clip, AdamW, schedule. Checkpoints
every save_every steps; a killed run started again with the same output_dir resumes where
its last checkpoint left off and repeats the same losses.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastllm.data import BatchLoader

from . import build
from .checkpoint import latest_checkpoint, resume_training_state, save_training_state
from .common import (
    CausalLMLoss,
    MaskedLMLoss,
    build_optimizer,
    build_scheduler,
    enable_activation_checkpointing,
    evaluate,
    optimizer_step,
    resolve_device,
    resolve_dtype,
    seed_everything,
    transformer_layers,
)
from .config import PretrainConfig, as_config, save_config
from .distributed import init_distributed, no_sync_fn, wrap_model
from .logging import MetricsLogger, ProgressBar, plot_loss_curve
from .export import export_final


def pretrain(config: PretrainConfig | str | dict | None = None, *, model=None, tokenizer=None) -> dict:
    """Run pre-training; returns {"step", "loss", "eval_loss", "eval_ppl", "output_dir", ...}.

    config: a PretrainConfig, a YAML path or a dict of fields. model / tokenizer: optional
    ready objects instead of building them from the config."""
    cfg = as_config(PretrainConfig, config)
    # ---- setup: devices, tokenizer, model, data
    info, device = init_distributed(cfg.distributed, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if tokenizer is None and not build.is_token_file(cfg.data):
        tokenizer = build.get_tokenizer(cfg, info, lambda: build.read_texts(cfg.data))
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    if model is None:
        model = build.get_model(cfg, vocab, cfg.seq_len)
    build.check_fit(model, vocab, cfg.seq_len, cfg.objective)
    train_set, eval_set = build.pretrain_datasets(cfg, tokenizer, model.config.vocab_size)
    loader = BatchLoader(train_set, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    eval_data = build.eval_batches(eval_set, cfg.batch_size, cfg.eval_batches, info)

    model.to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    loss_module = MaskedLMLoss(model) if cfg.objective == "mlm" else CausalLMLoss(model)
    wrapped = wrap_model(loss_module, info, transformer_layers(model), device)
    optimizer = build_optimizer(wrapped, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)

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
            save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info)
        last = metrics
    bar.close()

    # ---- finish: last evaluation, checkpoint, exported model, loss curve
    result = {"step": step, "loss": last.get("loss"), "output_dir": str(out)}
    if eval_data:
        result.update(run_eval())
        logger.log({"step": step, **{k: v for k, v in result.items() if k.startswith("eval_")}})
    save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info)
    export_final(model, wrapped, tokenizer, out / "final", info)
    if info.is_main and cfg.plot:
        try:
            result["loss_curve"] = str(plot_loss_curve(out / "metrics.jsonl"))
        except ImportError:
            pass
    return result
