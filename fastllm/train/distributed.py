"""Distributed set-up on torch.distributed: `torchrun --nproc_per_node N -m fastllm.cli ...`
sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on the CPU, nccl on GPUs. DDP replicates the model;
FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state, one unit per
transformer block plus the root."""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(mode: str, device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun. mode: auto | none | ddp | fsdp.
    Returns the rank info and this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if mode not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"distributed: expected auto, none, ddp or fsdp, got {mode!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or mode == "none":
        if mode == "none" and world_size > 1:
            raise ValueError(f"distributed: 'none' but launched with WORLD_SIZE={world_size}")
        return DistInfo(mode="fsdp" if mode == "fsdp" and dist.is_initialized() else "none"), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        # leave the group before the interpreter tears down: a group left to the exit's static
        # destructors can abort a rank whose communication threads are still running
        # ("terminate called without an active exception", exit code -6, after a finished run)
        atexit.register(destroy)
    return DistInfo(rank, world_size, local_rank, "ddp" if mode == "auto" else mode), device


def wrap_model(module: nn.Module, info: DistInfo, layers: nn.ModuleList | None, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around `module` (the loss module whose forward returns the loss)."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers if layers is not None else []:
            fully_shard(layer)
        fully_shard(module)
        return module
    return module


def no_sync_fn(wrapped: nn.Module, info: DistInfo):
    """A context factory that skips the gradient all-reduce on non-final micro-batches."""
    if info.mode == "ddp":
        return wrapped.no_sync
    if info.mode == "fsdp":
        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return fsdp_no_sync
    return None


def full_state_dicts(wrapped: nn.Module, optimizer, info: DistInfo) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name, as
    rank 0 saves them; works for plain, DDP and FSDP2 modules alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=info.world_size > 1)
    return get_state_dict(wrapped, optimizer, options=opts)


def load_full_state_dicts(wrapped: nn.Module, optimizer, model_state: dict, optim_state: dict | None,
                          info: DistInfo, strict: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    set_state_dict(wrapped, optimizer, model_state_dict=model_state, optim_state_dict=optim_state or {},
                   options=opts)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
