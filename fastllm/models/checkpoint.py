"""Hugging Face checkpoint layout: config.json + model.safetensors, or sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json. Never pickle.

    from_pretrained(path, dtype=None, device=None)  -> the model class named by config.json
    save_pretrained(model, path, max_shard_size=...)  writes config.json and the weights

The model class comes from config.json's model_type through fastllm.models.registry; the
model files never import this module. Each model class maps names between its state dict and
the file (`registry.HFNames`: `_from_hf(name, tensor, ...)`, `_to_hf(name, tensor)`: GPT-2
transposes its Conv1D weights, BERT renames old LayerNorm gamma/beta) and lists file tensors
it may ignore (`_ignored_hf`, e.g. GPT-2's causal-mask buffers). Any other missing,
unexpected or wrongly shaped tensor fails with an error that names it. Files are written to a
temporary name and renamed, so a killed save never leaves a half-written file under the
final name.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import registry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(
        f"dtype: expected None, 'auto', a torch floating dtype or one of {list(_DTYPES)}, "
        f"got {dtype!r}"
    )


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B\s*", str(size).upper())
    if not m:
        raise ValueError(
            f"max_shard_size: expected bytes or a string like '5GB' / '200MB', got {size!r}"
        )
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


# --------------------------------------------------------------------------- raw files


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r}")
    with open(file) as f:
        return json.load(f)


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read, judged from its header and size alone."""
    size = file.stat().st_size
    if size < 8:
        return f"{file.name} is truncated ({size} bytes, shorter than its 8-byte header length)"
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"{file.name} is truncated ({size} bytes; its header alone needs {8 + n})"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{file.name} has an unreadable header (not a safetensors file?)"
    if not isinstance(header, dict):
        return f"{file.name} has an unreadable header (not a safetensors file?)"
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"
               and isinstance(t, dict) and "data_offsets" in t), default=0)
    if 8 + n + end > size:
        return f"{file.name} is truncated ({size} bytes; its header promises {8 + n + end})"
    return None



def load_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards listed by the index)."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        with open(path / INDEX_NAME) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"path: neither {WEIGHTS_NAME} nor {INDEX_NAME} in {str(path)!r}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r}: {name} is missing (listed in {INDEX_NAME})")
        problem = safetensors_problem(path / name)
        if problem:
            raise ValueError(f"checkpoint {str(path)!r}: {problem}")
        with safe_open(str(path / name), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    raise ValueError(
                        f"{INDEX_NAME}: tensor {key!r} is in {name} but the index maps it to "
                        f"{weight_map.get(key)!r}"
                    )
                if key in state:
                    raise ValueError(f"checkpoint: tensor {key!r} appears in more than one file")
                state[key] = f.get_tensor(key)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(
                f"{INDEX_NAME}: tensors listed but not found in the shards: {absent[:5]}"
            )
    return state


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)


def _atomic_json(obj: dict, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, file)


def save_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, max_shard_size="5GB"
) -> list[str]:
    """Write `state` as model.safetensors, or as shards of at most max_shard_size bytes (a
    tensor larger than that gets a shard of its own) plus the index. Weight files of an
    earlier save in `path` that this one does not rewrite are removed. Returns file names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        _atomic_save(shard, path / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: n for n, shard in zip(names, shards, strict=True) for k in shard}
        _atomic_json(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, path / INDEX_NAME
        )
    keep = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    for stale in path.iterdir():
        if stale.name not in keep and (
            stale.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(stale.name)
        ):
            stale.unlink()
    return names


# --------------------------------------------------------------------------- models


def from_pretrained(path: str | os.PathLike, dtype=None, device=None, cls=None, head=None):
    """Load a Hugging Face checkpoint directory into the matching fastllm model.

    dtype: None / "auto" keeps the stored dtype; a torch dtype or its name converts every
    floating tensor. device: where the weights land (default CPU). The class comes from
    config.json's model_type and architectures (fastllm.models.registry). cls: expect this
    class; a task-head class of the checkpoint's trunk (e.g. LlamaForSequenceClassification on a
    causal-LM checkpoint) starts a new head from the trunk: the head's parameters are freshly
    initialised and `head` (a TaskHead) says what it predicts.
    """
    hf_config = read_config(path)
    entry = registry.lookup(hf_config.get("model_type"))
    file_cls = entry.class_for(hf_config.get("architectures"))
    model_cls = file_cls if cls is None else cls
    new_head = False
    if cls is not None and not issubclass(file_cls, cls):
        if cls not in [registry._load(p) for _, p in entry.heads]:
            raise ValueError(
                f"path: config.json describes a {file_cls.__name__}, not a {cls.__name__}"
            )
        new_head = True  # a head on this trunk, started from the checkpoint's trunk weights
    config = entry.config_class.from_hf_dict(hf_config)
    kwargs = {}
    if hasattr(model_cls, "hf_suffix"):
        from .heads import TaskHead

        default_pooling = "cls" if hf_config.get("model_type") == "bert" else "last"
        kwargs["head"] = head if new_head or head is not None else TaskHead.from_hf(hf_config, default_pooling)
    elif head is not None:
        raise ValueError(f"head: only task-head classes take a head, not {model_cls.__name__}")
    target = _parse_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")

    raw = load_safetensors(path, device="cpu")
    with torch.device("meta"):
        model = model_cls(config, **kwargs)
    expected = model.state_dict()
    ours: dict[str, torch.Tensor] = {}
    file_name: dict[str, str] = {}
    unexpected = []
    for name, tensor in raw.items():
        if any(re.search(p, name) for p in model_cls._ignored_hf):
            continue
        mapped = model_cls._from_hf(name, tensor, raw, config)
        if mapped is None:
            continue
        our_name, value = mapped
        if our_name not in expected:
            unexpected.append(name)
            continue
        ours[our_name], file_name[our_name] = value, name
    if unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r}: unexpected tensor(s) {unexpected} "
            f"(not part of {model_cls.__name__} for this config.json)"
        )
    if new_head:  # the head's own parameters start fresh: Normal(0, initializer_range) weights, zero biases
        std = getattr(config, "initializer_range", 0.02)
        for name, t in expected.items():
            if name not in ours and name.startswith(model_cls.head_param_prefixes):
                ours[name] = (torch.randn(t.shape) * std if name.endswith("weight") else torch.zeros(t.shape))
                file_name[name] = name
                raw.setdefault(name, ours[name])
    missing = [model_cls._hf_name(n) for n in expected if n not in ours]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r}: missing tensor(s) {missing}")
    for name, value in ours.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            stored = tuple(raw[file_name[name]].shape)
            note = (
                ""
                if stored == tuple(value.shape)
                else f" (stored as {list(stored)}, transposed on load)"
            )
            raise ValueError(
                f"checkpoint {str(path)!r}: tensor {file_name[name]!r}: expected shape "
                f"{list(expected[name].shape)}, got {list(value.shape)}{note}"
            )
    for name, value in ours.items():
        want = expected[name].dtype
        if want.is_floating_point != value.is_floating_point():
            raise ValueError(
                f"checkpoint {str(path)!r}: tensor {file_name[name]!r}: expected a "
                f"{'floating-point' if want.is_floating_point else str(want)} tensor, got {value.dtype}"
            )
        dt = target if (target is not None and value.is_floating_point()) else value.dtype
        ours[name] = value.to(device=device, dtype=dt)
    model.load_state_dict(ours, strict=True, assign=True)
    return model.to(device)


def save_pretrained(model, path: str | os.PathLike, max_shard_size="5GB") -> None:
    """Write config.json and the weights of a fastllm model in the Hugging Face layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        mapped = type(model)._to_hf(name, tensor)
        if mapped is not None:
            state[mapped[0]] = mapped[1]
    save_safetensors(state, path, max_shard_size=max_shard_size)
    hf = model.config.to_hf_dict()
    if hasattr(model, "hf_config_extra"):  # task heads: architectures, labels, problem type
        hf.update(model.hf_config_extra())
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        hf["torch_dtype"] = hf["dtype"] = str(dtypes.pop()).replace("torch.", "")
    _atomic_json(hf, path / CONFIG_NAME)
