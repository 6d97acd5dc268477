"""The step loop every training method runs, so each method's file reads setup -> loop -> finish.

    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    result = supervised_loop(cfg, info, step, loss_sum, wrapped=wrapped, ...)    # pretrain, SFT,
    export_final(...)                                                             # reward, DPO, heads

    result = train_loop(cfg, info, step, step_fn, save=save, evaluate=evaluate)   # PPO: own step_fn

`train_loop` owns the bookkeeping of steps start_step+1 .. cfg.max_steps: it calls
step_fn(step) (step = steps done so far) for one optimizer step's metrics, times it
(tokens/s), draws the progress line, evaluates every eval_every steps, logs every log_every
steps (and the last, and each step it evaluated at), checkpoints every save_every steps,
turns a FloatingPointError into one that names the step and the last good checkpoint, and
at the end evaluates, checkpoints and plots the loss curve. What a step is belongs to the
method: `supervised_step` is the one of supervised methods (grad_accum micro-batches, one
`optimizer_step` with the method's loss closure and count_fn); PPO passes a step_fn that
rolls out, then runs its epochs of minibatch `optimizer_step`s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import latest_checkpoint, save_training_state
from .common import count_tokens, evaluate, optimizer_step, resolve_device, resolve_dtype, seed_everything
from .config import TrainConfig, save_config
from .distributed import DistInfo, init_distributed, no_sync_fn
from .logging import MetricsLogger, ProgressBar, write_loss_curve


def start_run(cfg: TrainConfig) -> tuple[DistInfo, torch.device, torch.dtype, Path]:
    """The first lines of every method: processes and device (torchrun env), the autocast dtype,
    seeds, and output_dir with the config written into it (rank 0). Returns (info, device,
    dtype, output_dir)."""
    info, device = init_distributed(cfg.distributed, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return info, device, dtype, out


def train_loop(cfg: TrainConfig, info: DistInfo, start_step: int, step_fn: Callable[[int], dict], *,
               save: Callable[[int], object], evaluate: Callable[[], dict] | None = None) -> dict:
    """Run steps start_step+1 .. cfg.max_steps, then the final evaluation, checkpoint and plot.

    step_fn(step) -> metrics of one optimizer step, at least {"loss": float, "tokens": int}
        (tokens: what the step processed, for tokens/s); step counts the steps already done.
    save(step): write the checkpoint of `step` (every rank calls it).
    evaluate() -> {"eval_...": value}, or None for no evaluation.
    Uses cfg.max_steps, log_every, eval_every, save_every, output_dir, progress and plot.
    Returns {"step", "loss" (of the last step run), "output_dir", "eval_..." (final
    evaluation), "loss_curve" (the PNG, when written)}.
    """
    out = Path(cfg.output_dir)
    logger = MetricsLogger(out, enabled=info.is_main)
    bar = ProgressBar(cfg.max_steps, start_step, enabled=info.is_main and cfg.progress)
    step, last = start_step, {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        try:
            metrics = step_fn(step)
        except FloatingPointError as exc:
            bar.close()
            good = latest_checkpoint(out)
            raise FloatingPointError(f"{exc} at step {step + 1}: training stopped; last good checkpoint: "
                                     f"{good if good else 'none'}") from None
        step += 1
        metrics.update(step=step, tokens_per_s=metrics["tokens"] / (time.perf_counter() - t0))
        bar.update(step, metrics["loss"], metrics["tokens"])
        evaluated = evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps
        if evaluated:
            metrics.update(evaluate())
        if step % cfg.log_every == 0 or step == cfg.max_steps or evaluated:
            logger.log(metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save(step)
        last = metrics
    bar.close()

    result = {"step": step, "loss": last.get("loss"), "output_dir": str(out)}
    if evaluate is not None:
        final_eval = evaluate()
        result.update(final_eval)
        logger.log({"step": step, **final_eval})
    logger.close()
    save(step)
    if info.is_main and cfg.plot:
        png = write_loss_curve(logger.path)
        if png is not None:
            result["loss_curve"] = str(png)
    return result


def supervised_step(loader, loss_sum_fn: Callable[[dict], Tensor], wrapped: nn.Module, optimizer, scheduler,
                    cfg: TrainConfig, info: DistInfo, *, device: torch.device, dtype: torch.dtype,
                    count_fn: Callable[[dict], int] = count_tokens) -> Callable[[int], dict]:
    """The step_fn of a supervised method: cfg.grad_accum micro-batches from `loader`, then one
    `optimizer_step` normalised by count_fn (labelled tokens by default)."""
    no_sync = no_sync_fn(wrapped, info)

    def step_fn(step: int) -> dict:
        micro = [loader.next_batch() for _ in range(cfg.grad_accum)]
        return optimizer_step(micro, loss_sum_fn, wrapped, optimizer, scheduler, device=device, dtype=dtype,
                              max_grad_norm=cfg.max_grad_norm, world_size=info.world_size, no_sync=no_sync,
                              count_fn=count_fn)

    return step_fn


def held_out_eval(wrapped: nn.Module, loss_sum_fn: Callable[[dict], Tensor], batches: Sequence[dict], *,
                  device: torch.device, dtype: torch.dtype, world_size: int,
                  count_fn: Callable[[dict], int] = count_tokens) -> Callable[[], dict] | None:
    """An evaluate() for `train_loop`: `common.evaluate` over `batches` in eval mode; None when
    there are no batches (eval_batches=0)."""
    if not batches:
        return None

    def run_eval() -> dict:
        wrapped.eval()
        try:
            return evaluate(loss_sum_fn, batches, device=device, dtype=dtype, world_size=world_size,
                            count_fn=count_fn)
        finally:
            wrapped.train()

    return run_eval


def supervised_loop(cfg: TrainConfig, info: DistInfo, start_step: int, loss_sum_fn: Callable[[dict], Tensor], *,
                    wrapped: nn.Module, optimizer, scheduler, loader, eval_batches: Sequence[dict],
                    device: torch.device, dtype: torch.dtype, count_fn: Callable[[dict], int] = count_tokens,
                    trainable_only: bool = False) -> dict:
    """`train_loop` with `supervised_step`, `held_out_eval` over eval_batches and
    `save_training_state` checkpoints (only the trainable weights with trainable_only, as
    for PEFT adapters). Returns train_loop's result."""

    def save(step: int):
        return save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info,
                                   trainable_only=trainable_only)

    step_fn = supervised_step(loader, loss_sum_fn, wrapped, optimizer, scheduler, cfg, info, device=device,
                              dtype=dtype, count_fn=count_fn)
    run_eval = held_out_eval(wrapped, loss_sum_fn, eval_batches, device=device, dtype=dtype,
                             world_size=info.world_size, count_fn=count_fn)
    wrapped.train()
    return train_loop(cfg, info, start_step, step_fn, save=save, evaluate=run_eval)
