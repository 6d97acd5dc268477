"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory `output_dir/checkpoints/step_00000042/` holding

    model.safetensors   the trainable weights (all weights, or only the adapters with PEFT)
    optimizer.pt        optimizer state, parameters keyed by name (torch.save; loaded with
                        weights_only=True)
    rng_rank{r}.json    python / numpy / torch (/ cuda) RNG states of each rank
    state.json          step, scheduler and data-loader state, metrics so far, the config

It is written into `step_00000042.tmp/` and renamed into place only once complete (a rename
is atomic), so a killed run leaves either a whole checkpoint or a temp dir that is ignored
and cleaned up. The newest `keep_last` checkpoints are kept.

A checkpoint damaged after the fact (a file truncated or deleted, a disk that filled up) is
caught before use: `checkpoint_problem` checks that every file is there and readable (the
safetensors header and the byte ranges it promises, the optimizer archive's directory, the
JSON files), and `latest_checkpoint` skips a damaged checkpoint with a warning that names it
and falls back to the newest complete one. A save at step N removes checkpoints past N: they
belong to the run this one replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastllm.models.checkpoint import safetensors_problem

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike, rank: int = 0) -> Path | None:
    """The newest complete checkpoint; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, rank)
        if problem is None:
            return path
        warnings.warn(f"resume: skipping the damaged checkpoint {str(path)!r} ({problem}); trying the one "
                      "before it", stacklevel=2)
    return None


def checkpoint_problem(path: str | os.PathLike, rank: int = 0) -> str | None:
    """None for a complete, readable checkpoint directory, else what is wrong with it (which
    file is missing, truncated or unreadable)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    for name in ("state.json", "model.safetensors", "optimizer.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    for name in ("state.json", f"rng_rank{rank}.json"):
        file = path / name
        if not file.is_file():
            continue  # rng files are optional (an older layout)
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{name} is unreadable ({type(exc).__name__}: {exc})"
        if name == "state.json" and not (isinstance(data, dict) and "step" in data):
            return "state.json has no 'step'"
    problem = safetensors_problem(path / "model.safetensors")
    if problem:
        return problem
    try:
        with zipfile.ZipFile(path / "optimizer.pt") as z:  # torch.save writes a zip archive
            z.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"optimizer.pt is truncated or unreadable ({exc})"
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor], trainable_only: bool) -> dict:
    """The weights to save: every tensor, or only the trainable ones (PEFT adapters)."""
    if not trainable_only:
        return full_state
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full_state.items() if k in keep}


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model_state: dict, optimizer_state: dict,
                    rng: dict, state: dict, keep_last: int = 2, rank: int = 0, world_size: int = 1,
                    barrier=None) -> Path:
    """Write checkpoint `step` atomically (rank 0 writes weights, optimizer and state; every
    rank writes its RNG). `barrier` (callable) synchronises ranks between the phases."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier:
        barrier()
    with open(tmp / f"rng_rank{rank}.json", "w", encoding="utf-8") as f:
        json.dump(rng, f)
    if rank == 0:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({**state, "step": step, "world_size": world_size}, f, indent=1)
    if barrier:
        barrier()
    if rank == 0:
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step (resumed before the next save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        kept = list_checkpoints(output_dir)
        for later in [c for c in kept if int(c.name[len("step_"):]) > step]:  # an abandoned run's
            shutil.rmtree(later, ignore_errors=True)
        kept = [c for c in kept if int(c.name[len("step_"):]) <= step]
        for old in kept[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    if barrier:
        barrier()
    return final


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> dict:
    """{"model": tensors, "optimizer": state dict, "rng": RNG states, "state": state.json}."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("state.json", "model.safetensors", "optimizer.pt")):
        raise FileNotFoundError(f"resume: {str(path)!r} is not a checkpoint directory (no state.json, "
                                "model.safetensors or optimizer.pt)")
    problem = checkpoint_problem(path, rank)
    if problem is not None:
        raise ValueError(f"resume: the checkpoint {str(path)!r} is damaged: {problem}; pass resume=auto to use the "
                         "newest complete one, or resume=null to start afresh")
    with open(path / "state.json", encoding="utf-8") as f:
        state = json.load(f)
    rng_file = path / f"rng_rank{rank}.json"
    rng = None
    if rng_file.is_file():
        with open(rng_file, encoding="utf-8") as f:
            rng = json.load(f)
    return {
        "model": load_file(path / "model.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": rng,
        "state": state,
    }


# --------------------------------------------------------------------------- what the loops call

def _strip(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def save_training_state(cfg, step: int, wrapped: nn.Module, optimizer, scheduler, loader, info, *,
                        trainable_only: bool = False, extra: dict | None = None) -> Path:
    """Checkpoint a loop: the loss module's weights (keys without its `model.` prefix), the
    optimizer keyed by parameter name, scheduler, data position and RNG of every rank."""
    from .common import rng_state
    from .config import to_dict
    from .distributed import full_state_dicts

    model_state, optim_state = full_state_dicts(wrapped, optimizer, info)
    trainable = {_strip(n) for n, p in wrapped.named_parameters() if p.requires_grad}
    weights = {_strip(k): v for k, v in model_state.items()}
    if trainable_only:
        weights = {k: v for k, v in weights.items() if k in trainable or k.replace("module.", "") in trainable}
    state = {"scheduler": scheduler.state_dict(), "data": loader.state_dict(), "config": to_dict(cfg),
             "trainable_only": trainable_only, **(extra or {})}
    return save_checkpoint(cfg.output_dir, step, model_state=weights, optimizer_state=optim_state, rng=rng_state(),
                           state=state, keep_last=cfg.keep_last, rank=info.rank, world_size=info.world_size,
                           barrier=info.barrier if info.world_size > 1 else None)


def resume_training_state(cfg, wrapped: nn.Module, optimizer, scheduler, loader, info) -> tuple[int, dict]:
    """Restore the newest checkpoint (resume="auto") or the named one; returns (step, state.json
    contents), or (0, {}) when there is nothing to resume from."""
    from .common import set_rng_state
    from .distributed import load_full_state_dicts

    if cfg.resume is None:
        return 0, {}
    path = latest_checkpoint(cfg.output_dir, info.rank) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return 0, {}
    ckpt = load_checkpoint(path, info.rank)
    state = ckpt["state"]
    if state.get("world_size", 1) != info.world_size:
        raise ValueError(f"resume: {str(path)!r} was written by {state.get('world_size')} processes, this run "
                         f"has {info.world_size}; the data order would differ")
    weights = {"model." + k: v for k, v in ckpt["model"].items()}
    load_full_state_dicts(wrapped, optimizer, weights, ckpt["optimizer"], info,
                          strict=not state.get("trainable_only", False))
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    if ckpt["rng"] is not None:
        set_rng_state(ckpt["rng"])
    return int(state["step"]), state
