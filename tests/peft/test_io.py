"""PEFT-format adapters, both ways, against the real `peft` package on the transformers model
built from the same checkpoint: logits must match."""

from __future__ import annotations

import json

import peft as hf_peft  # test dependency (requirements/test.txt)
import pytest
import torch
import transformers  # test dependency (requirements/test.txt)
from safetensors import safe_open

from fastllm import peft as fpeft
from fastllm.models import save_pretrained
from tests.peft._tiny import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_model(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


@pytest.mark.parametrize("use_rslora,targets", [(False, ALL), (True, ["q_proj", "v_proj"])])
def test_fastllm_adapter_loads_in_peft_with_same_logits(tmp_path, use_rslora, targets):
    model = tiny_llama().eval()
    save_pretrained(model, tmp_path / "base")
    fpeft.apply_lora(model, target_modules=targets, r=4, alpha=8, use_rslora=use_rslora, init=False)
    fpeft.save_adapter(model, tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)  # adapters only, no base
    assert len(keys) == 2 * len(targets) * model.config.num_hidden_layers
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] == use_rslora

    hf = hf_peft.PeftModel.from_pretrained(_hf_model(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 128, (2, 9))
    ours = _logits(model, ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        with hf.disable_adapter():
            base = hf(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # ...the same way in both


def test_peft_trained_adapter_loads_into_fastllm(tmp_path):
    model = tiny_llama().eval()
    save_pretrained(model, tmp_path / "base")
    hf = _hf_model(tmp_path / "base")
    cfg = hf_peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    pm = hf_peft.get_peft_model(hf, cfg)
    # a few training steps in peft, so the file holds trained (not just initial) weights
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 128, (4, 8))
    for _ in range(3):
        loss = pm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(str(tmp_path / "adapter"))

    fpeft.load_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 128, (3, 7))
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
    torch.testing.assert_close(_logits(model, ids), theirs, rtol=1e-4, atol=1e-4)
    assert fpeft.trainable_parameters(model).trainable == sum(
        p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_save_load_round_trip_in_fastllm_and_errors(tmp_path):
    model = tiny_llama().eval()
    fpeft.apply_lora(model, target_modules=["q_proj", "o_proj"], r=2, init=False, adapter_name="mine")
    fpeft.save_adapter(model, tmp_path / "a", adapter_name="mine")
    fresh = tiny_llama().eval()
    fpeft.load_adapter(fresh, tmp_path / "a", adapter_name="mine")
    ids = torch.randint(0, 128, (2, 5))
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors")
                                                             .read_bytes())
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        fpeft.load_adapter(tiny_llama(), tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="unexpected tensors .*o_proj"):
        fpeft.load_adapter(tiny_llama(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fpeft.load_adapter(tiny_llama(), tmp_path / "missing")
