"""Checkpoint load/save in the Hugging Face layout: sharding, dtype on load, stale files,
and the errors for missing, unexpected and wrongly shaped tensors; config presets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastllm.models import (
    PRESETS,
    BertForMaskedLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    build_model,
    config_from_hf_dict,
    from_pretrained,
    preset,
    save_pretrained,
)
from fastllm.models.checkpoint import INDEX_NAME, WEIGHTS_NAME
from tests.conftest import assert_close


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-bert"]
)
def test_round_trip(name, tmp_path):
    model = build_model(preset(name))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    _same_weights(model, loaded)
    assert not list(tmp_path.glob("*.tmp"))


def test_sharded_save_and_load(tmp_path):
    model = build_model(preset("tiny-llama"))
    files = save_pretrained(model, tmp_path, max_shard_size="40KB") or sorted(
        p.name for p in tmp_path.glob("model-*")
    )
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / WEIGHTS_NAME).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    _same_weights(model, from_pretrained(tmp_path, cls=LlamaForCausalLM))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert_close(hf(ids).logits, model.logits(model(ids)))
    # saving unsharded over it removes the old shards and index
    save_pretrained(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).exists() and not (tmp_path / INDEX_NAME).exists()
    assert not list(tmp_path.glob("model-0*"))
    del files


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "auto", None])
def test_dtype_on_load(dtype, tmp_path):
    model = build_model(preset("tiny-gpt2"))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=dtype)
    expect = {torch.bfloat16: torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {expect}
    with pytest.raises(ValueError, match="dtype: expected"):
        from_pretrained(tmp_path, dtype="int8")


def _edit(tmp_path, fn):
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    fn(state)
    save_file(state, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_pretrained(build_model(preset("tiny-llama")), tmp_path)
    _edit(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_pretrained(build_model(preset("tiny-llama")), tmp_path)
    _edit(tmp_path, lambda s: s.__setitem__("model.layers.7.extra", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.7.extra'\]"):
        from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    save_pretrained(build_model(preset("tiny-llama")), tmp_path)
    _edit(tmp_path, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(
        ValueError, match=r"tensor 'model.norm.weight': expected shape \[64\], got \[65\]"
    ):
        from_pretrained(tmp_path)


def test_gpt2_conv1d_shape_error_mentions_the_transpose(tmp_path):
    save_pretrained(build_model(preset("tiny-gpt2")), tmp_path)
    _edit(
        tmp_path, lambda s: s.__setitem__("transformer.h.0.mlp.c_fc.weight", torch.zeros(64, 200))
    )
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight'.*transposed on load"):
        from_pretrained(tmp_path)


def test_gpt2_original_layout_loads(tmp_path):
    # The original GPT-2 files: no `transformer.` prefix, causal-mask buffers, an lm_head copy.
    model = build_model(preset("tiny-gpt2"))
    save_pretrained(model, tmp_path)

    def old_style(s):
        for k in list(s):
            s[k.removeprefix("transformer.")] = s.pop(k)
        s["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
        s["lm_head.weight"] = s["wte.weight"].clone()

    _edit(tmp_path, old_style)
    _same_weights(model, from_pretrained(tmp_path, cls=GPT2LMHeadModel))
    _edit(tmp_path, lambda s: s.__setitem__("lm_head.weight", torch.zeros_like(s["wte.weight"])))
    with pytest.raises(ValueError, match="lm_head.weight: GPT-2's head is tied"):
        from_pretrained(tmp_path)


def test_bert_legacy_names_and_ignored_heads(tmp_path):
    model = build_model(preset("tiny-bert"))
    save_pretrained(model, tmp_path)

    def legacy(s):
        s["bert.embeddings.LayerNorm.gamma"] = s.pop("bert.embeddings.LayerNorm.weight")
        s["bert.embeddings.LayerNorm.beta"] = s.pop("bert.embeddings.LayerNorm.bias")
        s["bert.pooler.dense.weight"] = torch.zeros(64, 64)
        s["cls.seq_relationship.weight"] = torch.zeros(2, 64)
        s["cls.predictions.decoder.weight"] = s["bert.embeddings.word_embeddings.weight"].clone()

    _edit(tmp_path, legacy)
    _same_weights(model, from_pretrained(tmp_path, cls=BertForMaskedLM))


def test_bert_mlm_head_is_tied(tmp_path):
    model = build_model(preset("tiny-bert"))
    ids = torch.randint(0, 128, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    model.mlm_loss(ids, labels).backward()
    emb = model.bert.embeddings.word_embeddings.weight
    assert emb.grad is not None and emb.grad[labels[labels != -100]].abs().sum() > 0
    assert not any("decoder" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="token_type_ids: token ids must be in"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="input_ids: sequence length 129 exceeds"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 128\)"):
        model(torch.full((1, 3), 128))


def test_wrong_class_and_missing_files(tmp_path):
    save_pretrained(build_model(preset("tiny-bert")), tmp_path)
    with pytest.raises(ValueError, match="not a LlamaForCausalLM"):
        from_pretrained(tmp_path, cls=LlamaForCausalLM)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_hf_config(name):
    cfg = preset(name)
    assert config_from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "name, params",
    [
        ("smollm2-135m", 134_515_008),
        ("llama-3.2-1b", 1_235_814_400),
        ("gpt2", 124_439_808),
        ("qwen2.5-0.5b", 494_032_768),
    ],
)
def test_published_sizes(name, params):
    with torch.device("meta"):
        model = build_model(preset(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_preset_errors():
    with pytest.raises(ValueError, match="name: expected one of"):
        preset("llama-9000")
    with pytest.raises(ValueError, match="num_key_value_heads: expected a divisor"):
        preset("tiny-llama", num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size: expected a positive integer"):
        preset("tiny-bert", hidden_size=0)


def test_tied_llama_file_with_a_head_copy(tmp_path):
    model = build_model(preset("tiny-qwen2"))  # tied
    save_pretrained(model, tmp_path)
    _edit(
        tmp_path, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone())
    )
    _same_weights(model, from_pretrained(tmp_path))
    _edit(tmp_path, lambda s: s.__setitem__("lm_head.weight", torch.zeros(128, 64)))
    with pytest.raises(ValueError, match="lm_head.weight: config.json ties it"):
        from_pretrained(tmp_path)
