"""Adapters on disk, without the base weights: adapter_config.json + adapter_model.safetensors.

LoRA uses the Hugging Face PEFT layout, so the same directory loads with
peft.PeftModel.from_pretrained on the matching transformers model and back:

    key    base_model.model.<module name>.lora_A.weight   (r, in)
           base_model.model.<module name>.lora_B.weight   (out, r)
    config {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
            "use_rslora", "bias": "none", "task_type": "CAUSAL_LM", ...}

Our Llama-family module names equal Hugging Face's, so <module name> is the same string in
both (model.layers.0.self_attn.q_proj). A task head trained with the adapter (a classifier or
score layer: PEFT's `modules_to_save`) is stored whole beside it, as PEFT stores it: keys
base_model.model.<module>.<param> (LoRA; the bare fastllm names otherwise) and the module names
in the config's "modules_to_save". Other methods (bottleneck adapters, prefix and prompt
tuning) write their parameters under their fastllm names with peft_type "FASTLLM_<METHOD>";
they load into a model to which the same method was applied. Files are written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .lora import LoraConfig, apply_lora, lora_modules
from .utils import adapter_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT config fields we cannot honour; loading fails rather than silently differing.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _lora_peft_config(cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(set(cfg.target_modules))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "use_rslora": cfg.use_rslora, "init_lora_weights": True, "inference_mode": True, "revision": None,
        "layers_pattern": None, "modules_to_save": None, **_UNSUPPORTED,
    }


def _saved_modules(model: nn.Module, modules: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """Every parameter of the named modules (a head trained whole), keyed prefix + full name."""
    tensors = {}
    for module in modules:
        try:
            sub = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"modules_to_save: the model has no module {module!r}") from None
        for name, p in sub.named_parameters():
            tensors[f"{prefix}{module}.{name}"] = p.detach().contiguous()
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                 base_model_name_or_path: str | None = None, modules_to_save: list[str] | None = None,
                 task_type: str | None = None) -> None:
    """Write one adapter (LoRA in PEFT's layout; other methods in ours) to directory `path`.
    modules_to_save: modules stored whole with it (a task head: ["score"], ["classifier"]);
    task_type: PEFT's task_type (default CAUSAL_LM for LoRA)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora = lora_modules(model)
    if lora:
        cfg = getattr(model, "peft_config", {}).get(adapter_name)
        if cfg is None:
            raise KeyError(f"adapter_name: expected one of {list(getattr(model, 'peft_config', {}))}, "
                           f"got {adapter_name!r}")
        if any(m.merged == adapter_name for m in lora.values()):
            raise RuntimeError(f"adapter_name: {adapter_name!r} is merged into the weights; unmerge before saving")
        tensors = {}
        for name, m in lora.items():
            if adapter_name in m.configs:
                tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].detach().contiguous()
                tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].detach().contiguous()
        config = _lora_peft_config(cfg, base_model_name_or_path)
        prefix = _PREFIX
    else:
        tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
        if not tensors:
            raise ValueError("model: has no adapter parameters to save")
        config = {"peft_type": getattr(model, "peft_type", "FASTLLM_ADAPTER"),
                  **getattr(model, "peft_settings", {})}
        prefix = ""
    if modules_to_save:
        tensors.update(_saved_modules(model, list(modules_to_save), prefix))
        config["modules_to_save"] = list(modules_to_save)
    if task_type is not None:
        config["task_type"] = task_type
    _atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))


def read_adapter_config(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: expected {CONFIG_NAME} in {path}")
    return json.loads(file.read_text())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: expected {WEIGHTS_NAME} in {path} (pickled adapter_model.bin is not read)")
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _check_supported(config: dict) -> None:
    for key, neutral in _UNSUPPORTED.items():
        value = config.get(key, neutral)
        if value not in (neutral, None) and not (isinstance(neutral, dict) and not value):
            raise ValueError(f"{CONFIG_NAME}: {key}={value!r} is not supported (expected {neutral!r})")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                 backend: str | None = None) -> nn.Module:
    """Load an adapter directory into `model`. LoRA (ours or one trained with PEFT) is applied
    with the file's config; other methods load into a model that already has them.
    Every file tensor must find its parameter and every adapter parameter its tensor; the
    modules the config lists in modules_to_save (a task head) are loaded whole."""
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_tensors(path)
    saved_modules = config.get("modules_to_save") or []
    if config.get("peft_type") == "LORA":
        _check_supported(config)
        apply_lora(model, target_modules=config["target_modules"], r=int(config["r"]),
                   alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                   use_rslora=bool(config.get("use_rslora", False)), adapter_name=adapter_name, backend=backend)
        wanted = {}
        for name, m in lora_modules(model).items():
            if adapter_name in m.configs:
                wanted[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name]
                wanted[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name]
        # PEFT keeps the adapter name in keys of non-default adapters saved by some versions
        tensors = {k.replace(f".lora_A.{adapter_name}.", ".lora_A.").replace(f".lora_B.{adapter_name}.", ".lora_B."): v
                   for k, v in tensors.items()}
        prefix = _PREFIX
    else:
        wanted = dict(model.named_parameters())
        wanted = {k: wanted[k] for k in adapter_state_dict(model)}
        prefix = ""
    for module in saved_modules:
        sub = model.get_submodule(module)
        for name, p in sub.named_parameters():
            wanted[f"{prefix}{module}.{name}"] = p
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{WEIGHTS_NAME}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for key, param in wanted.items():
            t = tensors[key]
            if t.shape != param.shape:
                raise ValueError(f"{key}: expected shape {list(param.shape)}, got {list(t.shape)}")
            param.copy_(t.to(param.dtype))
    return model
