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

from fastllm.data import BatchLoader
from fastllm.peft.utils import adapter_parameter_names

from . import build
from .checkpoint import resume_training_state
from .common import (
    CausalLMLoss,
    enable_activation_checkpointing,
    freeze_parameters,
    optimizer_for,
    transformer_layers,
)
from .config import SFTConfig, as_config
from .distributed import wrap_model
from .export import export_final
from .loop import start_run, supervised_loop
from .peft_glue import apply_peft


def sft(config: SFTConfig | str | dict | None = None, *, model=None, tokenizer=None, records=None) -> dict:
    """Run SFT; returns {"step", "loss", "eval_loss", "eval_ppl", "trainable_params", ...}.

    config: an SFTConfig, a YAML path or a dict of fields. model / tokenizer / records:
    optional ready objects instead of what the config names."""
    cfg = as_config(SFTConfig, config)
    # ---- setup: devices, tokenizer, model, data
    info, device, dtype, out = start_run(cfg)
    records, tokenizer, model = build.chat_setup(cfg, info, "chat", records=records, tokenizer=tokenizer,
                                                 model=model)
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
    optimizer, scheduler = optimizer_for(wrapped, cfg)
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    adapters_only = bool(cfg.peft) or bool(adapter_parameter_names(model))  # a PEFT model passed in too

    def loss_sum(batch):
        return wrapped(**batch)

    # ---- train (fastllm.train.loop: steps, eval, logging, checkpoints, final eval + checkpoint + plot)
    result = supervised_loop(cfg, info, step, loss_sum, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                             loader=loader, eval_batches=eval_data, device=device, dtype=dtype,
                             trainable_only=adapters_only)

    # ---- finish: the exported model or adapters
    export_final(model, wrapped, tokenizer, out / "final", info, adapters_only=adapters_only)
    result["trainable_params"] = n_trainable
    return result
