"""Bottleneck adapters, prefix tuning and prompt tuning on the tiny Llama: identity at init
where promised, gradients only to adapter parameters, learning a small task, adapter-only
save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from fastllm import peft
from tests.peft._tiny import (
    constant_task,
    grads_only_on_adapters,
    successor_task,
    tiny_llama,
    train,
)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model.logits(model(ids, **kw))


# --------------------------------------------------------------------------- bottleneck adapters


@pytest.mark.parametrize("kind,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_bottleneck_identity_at_init_and_placement(kind, per_layer):
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 8))
    base = _logits(model, ids)
    names = peft.apply_adapters(model, kind=kind, reduction_factor=8, nonlinearity="gelu")
    assert len(names) == per_layer * model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].mlp.down_proj, peft.AdaptedLinear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, peft.AdaptedLinear) == (kind == "houlsby")
    adapter = model.model.layers[0].mlp.down_proj.adapter
    assert adapter.down.out_features == 64 // 8 and isinstance(adapter.act, torch.nn.GELU)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)


def test_bottleneck_gradients_learning_disable_and_save(tmp_path):
    model = tiny_llama()
    peft.apply_adapters(model, kind="houlsby", reduction_factor=4)
    ids, labels = successor_task(128)
    grads_only_on_adapters(model, model.loss(ids, labels))
    model.zero_grad()
    first, last = train(model, lambda: model.loss(ids, labels), steps=60, lr=1e-2)
    assert last < 0.5 * first, (first, last)

    model.eval()
    test_ids = torch.randint(0, 128, (2, 6))
    trained = _logits(model, test_ids)
    with peft.disable_adapters(model):
        assert not torch.allclose(_logits(model, test_ids), trained)
    peft.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert all(".adapter." in k for k in f.keys())  # no base weights
    fresh = tiny_llama().eval()
    peft.apply_adapters(fresh, kind="houlsby", reduction_factor=4)
    peft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, test_ids), trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kind: expected one of"):
        peft.apply_adapters(tiny_llama(), kind="parallel")


# --------------------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("reparam_hidden", [None, 32])
def test_prefix_gradients_learning_fold_and_save(tmp_path, reparam_hidden):
    torch.manual_seed(0)
    base = tiny_llama()
    model = peft.PrefixTuningModel(base, num_virtual_tokens=4, reparam_hidden=reparam_hidden)
    cfg = base.config
    kv = model.prefix_kv(3)
    assert len(kv) == cfg.num_hidden_layers and kv[0][0].shape == (3, 4, cfg.num_key_value_heads, cfg.head_dim)
    ids, labels = constant_task(128)
    grads_only_on_adapters(model, model.loss(ids, labels))
    model.zero_grad()
    first, last = train(model, lambda: model.loss(ids, labels), steps=40, lr=3e-2)
    assert last < 0.5 * first, (first, last)

    model.eval()
    test_ids = torch.randint(0, 128, (2, 6))
    trained = _logits(model, test_ids)
    assert not torch.allclose(trained, _logits(base, test_ids))  # the prefix does steer the model
    model.fold()
    assert model.prefix.mlp is None and model.prefix.prefixes.shape == (cfg.num_hidden_layers, 2, 4,
                                                                       cfg.num_key_value_heads, cfg.head_dim)
    torch.testing.assert_close(_logits(model, test_ids), trained, rtol=1e-5, atol=1e-5)
    peft.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["prefix.prefixes"]
    fresh = peft.PrefixTuningModel(tiny_llama(), num_virtual_tokens=4).eval()
    peft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, test_ids), _logits(model, test_ids), rtol=0, atol=0)


def test_prefix_with_padding_mask_matches_unpadded():
    # Right padding must not change the real tokens' outputs: the prefix stays visible to
    # every query and the padded keys are masked.
    model = peft.PrefixTuningModel(tiny_llama(), num_virtual_tokens=3).eval()
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    padded = _logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(padded[1, :4], _logits(model, ids[1:, :4])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], _logits(model, ids[:1])[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- prompt tuning


def test_prompt_from_text_equals_base_on_prepended_text():
    base = tiny_llama().eval()
    text_ids = torch.tensor([5, 17, 42])
    model = peft.PromptTuningModel(base, num_virtual_tokens=3, init_token_ids=text_ids)
    torch.testing.assert_close(model.prompt.weight, base.model.embed_tokens.weight[text_ids])
    ids = torch.randint(0, 128, (2, 6))
    expected = _logits(base, torch.cat([text_ids.expand(2, 3), ids], 1))[:, 3:]
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # a shorter text is repeated to fill the prompt
    model5 = peft.PromptTuningModel(base, num_virtual_tokens=5, init_token_ids=[9, 8])
    torch.testing.assert_close(model5.prompt.weight, base.model.embed_tokens.weight[[9, 8, 9, 8, 9]])


class _Tok:
    def encode(self, text):
        return [ord(c) % 128 for c in text]


def test_prompt_random_init_gradients_learning_and_save(tmp_path):
    base = tiny_llama()
    model = peft.PromptTuningModel(base, num_virtual_tokens=6)
    assert model.prompt.weight.std().item() == pytest.approx(base.model.embed_tokens.weight.std().item(), rel=0.3)
    ids, labels = constant_task(128)
    grads_only_on_adapters(model, model.loss(ids, labels))
    model.zero_grad()
    first, last = train(model, lambda: model.loss(ids, labels), steps=40, lr=5e-2)
    assert last < 0.5 * first, (first, last)
    counts = peft.trainable_parameters(model)
    assert counts.trainable == 6 * base.config.hidden_size

    model.eval()
    test_ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = _logits(model, test_ids, attention_mask=mask)
    peft.save_adapter(model, tmp_path)
    fresh = peft.PromptTuningModel(tiny_llama(), num_virtual_tokens=6, init_text="hi there", tokenizer=_Tok())
    peft.load_adapter(fresh.eval(), tmp_path)
    torch.testing.assert_close(_logits(fresh, test_ids, attention_mask=mask), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer"):
        peft.PromptTuningModel(base, init_text="x")
