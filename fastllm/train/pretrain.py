"""Pre-training: causal LM (next token) or masked LM on packed blocks of a token stream.

    from fastllm.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(model="tiny-llama", data="shakespeare", max_steps=200))

One step: grad_accum micro-batches of batch_size blocks (per process), loss = summed
cross-entropy / the step's real token count, backward, clip, AdamW, schedule. Checkpoints
every save_every steps; a killed run started again with the same output_dir resumes where
its last checkpoint left off and repeats the same losses.
"""

from __future__ import annotations

from fastllm.data import BatchLoader

from . import build
from .checkpoint import resume_training_state
from .common import (
    CausalLMLoss,
    MaskedLMLoss,
    enable_activation_checkpointing,
    optimizer_for,
    transformer_layers,
)
from .config import PretrainConfig, as_config
from .distributed import wrap_model
from .export import export_final
from .loop import start_run, supervised_loop


def pretrain(config: PretrainConfig | str | dict | None = None, *, model=None, tokenizer=None) -> dict:
    """Run pre-training; returns {"step", "loss", "eval_loss", "eval_ppl", "output_dir", ...}.

    config: a PretrainConfig, a YAML path or a dict of fields. model / tokenizer: optional
    ready objects instead of building them from the config."""
    cfg = as_config(PretrainConfig, config)
    # ---- setup: devices, tokenizer, model, data
    info, device, dtype, out = start_run(cfg)
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
    optimizer, scheduler = optimizer_for(wrapped, cfg)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)

    def loss_sum(batch):
        return wrapped(**batch)

    # ---- train (fastllm.train.loop: steps, eval, logging, checkpoints, final eval + checkpoint + plot)
    result = supervised_loop(cfg, info, step, loss_sum, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                             loader=loader, eval_batches=eval_data, device=device, dtype=dtype)

    # ---- finish: the exported model
    export_final(model, wrapped, tokenizer, out / "final", info)
    return result
