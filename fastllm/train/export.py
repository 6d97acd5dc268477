"""The artefacts a finished run leaves in output_dir/final: the model in the Hugging Face
layout (config.json + model.safetensors) and its tokenizer, or with PEFT only the adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from fastllm.models import save_pretrained

from .distributed import DistInfo


def _unsharded_model(model, wrapped, info: DistInfo):
    """The model itself, or (FSDP) a CPU copy on rank 0 filled from the full state dict."""
    if info.mode != "fsdp":
        return model
    state = _model_state(wrapped, info)  # a collective: every rank takes part
    if not info.is_main:
        return None
    head = {"head": model.head} if hasattr(model, "head") else {}  # task heads: what they predict
    copy = type(model)(model.config, **head)
    copy.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return copy


def _model_state(wrapped, info: DistInfo) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_final(model, wrapped, tokenizer, path: Path, info: DistInfo, adapters_only: bool = False) -> None:
    if adapters_only:
        from .peft_glue import save_adapters

        if info.mode == "fsdp":
            raise NotImplementedError("distributed: saving adapters from an FSDP run is not supported; use ddp")
        if info.is_main:
            save_adapters(model, path)
    else:
        to_save = _unsharded_model(model, wrapped, info)
        if info.is_main:
            with torch.no_grad():
                save_pretrained(to_save, path)
    if info.is_main and tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(path)
    info.barrier()
