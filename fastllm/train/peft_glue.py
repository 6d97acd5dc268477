"""PEFT through the SFT loop: `peft: {method: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}`
calls fastllm.peft.apply_<method>(model, **the rest), which freezes the base model and adds
the adapter modules; at the end only the adapter weights are saved."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file


def apply_peft(model, spec: dict):
    """Apply fastllm.peft.apply_<spec["method"]> (default lora) with the other keys as kwargs."""
    import fastllm.peft as peft

    spec = dict(spec)
    method = spec.pop("method", "lora")
    fn = getattr(peft, f"apply_{method}", None)
    if fn is None:
        known = sorted(n[len("apply_"):] for n in dir(peft) if n.startswith("apply_"))
        raise ValueError(f"peft.method: expected one of {known}, got {method!r}")
    result = fn(model, **spec)
    model = result if result is not None and hasattr(result, "parameters") else model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"peft: {method} left no trainable parameter")
    return model


def save_adapters(model, path: Path) -> None:
    """fastllm.peft's own adapter format when it has a saver, else the trainable tensors."""
    import fastllm.peft as peft

    for name in ("save_adapter", "save_adapters", "save_peft"):
        fn = getattr(peft, name, None)
        if fn is not None:
            fn(model, path)
            return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, path / "adapter_model.safetensors")
