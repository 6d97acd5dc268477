"""LoRA module swap on the tiny Llama: identity at init, gradients only to A and B, learning,
named adapters (switch, disable, delete), merge/unmerge round trip per dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastllm import peft
from fastllm.ops import lora_linear_reference
from tests.conftest import compiled_backends
from tests.peft._tiny import grads_only_on_adapters, successor_task, tiny_llama, train

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


def test_identity_at_init_and_swaps_only_targets():
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 10))
    base = _logits(model, ids)
    names = peft.apply_lora(model, target_modules=ALL, r=4, alpha=8)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].self_attn.q_proj, peft.LoRALinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, peft.LoRALinear)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # base keys unchanged
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)  # B = 0: exactly the base


def test_regex_and_all_linear_targets():
    model = tiny_llama()
    names = peft.apply_lora(model, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj", r=2)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = tiny_llama(tie_word_embeddings=False)
    names = peft.apply_lora(model, target_modules="all-linear", r=2)
    assert "lm_head" not in names and len(names) == 7 * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="target_modules: no nn.Linear"):
        peft.apply_lora(tiny_llama(), target_modules=["nope"])


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_module_matches_reference_with_dropout(backend):
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    mod = peft.LoRALinear(lin, backend=backend)
    mod.add_adapter("default", peft.LoraConfig(r=4, alpha=6, dropout=0.0, init=False))
    x = torch.randn(3, 5, 24)
    a, b = mod.lora_A["default"], mod.lora_B["default"]
    expected = lora_linear_reference(x, lin.weight, lin.bias, a, b, 1.5)
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    mod.configs["default"].dropout = 0.5
    mod.train()
    torch.manual_seed(3)
    y = mod(x)
    torch.manual_seed(3)
    keep = torch.rand(x.shape) >= 0.5
    torch.testing.assert_close(y, lora_linear_reference(x, lin.weight, lin.bias, a, b, 1.5, keep, 0.5),
                               rtol=1e-5, atol=1e-5)
    mod.eval()  # no dropout in eval
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_and_gaussian_init():
    cfg = peft.LoraConfig(r=16, alpha=8, use_rslora=True, init="gaussian")
    assert cfg.scaling == pytest.approx(8 / 4)
    assert peft.LoraConfig(r=16, alpha=8).scaling == pytest.approx(0.5)
    mod = peft.LoRALinear(nn.Linear(64, 32))
    mod.add_adapter("g", cfg)
    assert mod.lora_A["g"].std().item() == pytest.approx(1 / 16, rel=0.2)
    assert torch.count_nonzero(mod.lora_B["g"]) == 0
    with pytest.raises(ValueError, match="r: expected a positive integer"):
        peft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="init: expected one of"):
        peft.LoraConfig(init="pissa")


def test_gradients_reach_only_adapters_and_counts():
    model = tiny_llama()
    peft.apply_lora(model, target_modules=ALL, r=4, alpha=8, init=False)
    ids, labels = successor_task(128, batch=2)
    grads_only_on_adapters(model, model.loss(ids, labels))
    counts = peft.trainable_parameters(model)
    L, H, inter, kv = model.config.num_hidden_layers, 64, 128, model.config.num_key_value_heads * model.config.head_dim
    expected = L * 4 * ((H + H) + (H + kv) * 2 + (H + H) + (H + inter) * 2 + (inter + H))
    assert counts.trainable == expected
    assert 0 < counts.percent < 100 and "trainable%" in str(counts)


def test_tiny_model_learns_counting():
    model = tiny_llama()
    peft.apply_lora(model, target_modules=ALL, r=8, alpha=16)
    ids, labels = successor_task(128)
    first, last = train(model, lambda: model.loss(ids, labels), steps=60, lr=1e-2)
    assert last < 0.5 * first, (first, last)


def test_named_adapters_switch_disable_delete():
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 7))
    base = _logits(model, ids)
    peft.apply_lora(model, target_modules=["q_proj", "v_proj"], r=4, init=False, adapter_name="a")
    peft.apply_lora(model, target_modules=["v_proj", "down_proj"], r=2, init=False, adapter_name="b")
    assert model.active_adapter == "a"  # the first adapter stays active
    assert model.model.layers[0].mlp.down_proj.active_adapter is None  # has only "b"
    out_a = _logits(model, ids)
    peft.set_adapter(model, "b")
    out_b = _logits(model, ids)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    with peft.disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), out_b, rtol=0, atol=0)
    peft.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model, ids), out_a, rtol=0, atol=0)
    peft.delete_adapter(model, "a")
    assert set(model.peft_config) == {"b"}
    assert "a" not in model.model.layers[0].self_attn.v_proj.configs
    with pytest.raises(KeyError, match="adapter_name"):
        peft.set_adapter(model, "a")
    peft.set_adapter(model, "b")
    torch.testing.assert_close(_logits(model, ids), out_b, rtol=0, atol=0)


# Round-trip bound relative to max|W + sBA|: a few roundings of the merged weight.
ROUND_TRIP = {torch.float64: 1e-15, torch.float32: 3e-7, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", list(ROUND_TRIP))
def test_merge_matches_unmerged_and_round_trips(dtype):
    model = tiny_llama().to(dtype).eval()
    peft.apply_lora(model, target_modules=ALL, r=4, alpha=8, init=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    ids = torch.randint(0, 128, (2, 6))
    unmerged = _logits(model, ids)
    peft.merge_lora(model)
    merged = _logits(model, ids)
    # merged and unmerged differ by the dtype's rounding of the logits (a few ulp of their max)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    rel = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()  # noqa: E731
    assert rel(merged, unmerged) <= tol
    peft.unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in before:
            mod = model.get_submodule(n.rsplit(".", 1)[0])
            scale = (before[n].double() + mod.delta_weight("default").double()).abs().max()
            err = (p.double() - before[n].double()).abs().max() / scale
            assert err <= ROUND_TRIP[dtype], (n, err.item())
    assert rel(_logits(model, ids), unmerged) <= tol


def test_merged_adapter_cannot_be_switched_or_disabled():
    model = tiny_llama()
    peft.apply_lora(model, target_modules=["q_proj"], r=2, adapter_name="a")
    peft.apply_lora(model, target_modules=["q_proj"], r=2, adapter_name="b")
    peft.merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge it before switching"):
        peft.set_adapter(model, "b")
    with pytest.raises(RuntimeError, match="unmerge first"), peft.disable_adapters(model):
        model(torch.randint(0, 128, (1, 4)))


def test_torch_compile_fullgraph_through_lora_model():
    torch._dynamo.reset()
    model = tiny_llama()
    peft.apply_lora(model, target_modules=["q_proj", "v_proj", "down_proj"], r=4, init=False)
    model.eval()
    ids, labels = successor_task(128, batch=2, length=8)
    compiled = torch.compile(lambda: model.loss(ids, labels), fullgraph=True, backend="aot_eager")
    loss = compiled()
    grads = torch.autograd.grad(loss, peft.adapter_parameters(model))
    loss_eager = model.loss(ids, labels)
    grads_eager = torch.autograd.grad(loss_eager, peft.adapter_parameters(model))
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("r,dropout,groups", [(16, 0.0, 2), (4, 0.0, 2), (16, 0.1, 0)])
def test_grouped_projections_match_module_calls(monkeypatch, r, dropout, groups):
    """The decoder's q/k/v and gate/up LoRA projections run as one lora_linear_group op per
    group (`groups` per layer; none with dropout while training): loss and every adapter
    gradient as the per-module calls give them."""
    from fastllm.models import _decoder

    model = tiny_llama()
    peft.apply_lora(model, target_modules=ALL, r=r, alpha=8, dropout=dropout, init=False)
    ids, labels = successor_task(128, batch=2)
    params = peft.adapter_parameters(model)

    def run():
        torch.manual_seed(3)  # the same dropout masks both ways
        with torch.profiler.profile() as prof:
            loss = model.loss(ids, labels)
        names = [e.name for e in prof.events()]
        return loss, torch.autograd.grad(loss, params), names.count("fastllm::lora_linear_group")

    loss, grads, calls = run()
    assert calls == groups * model.config.num_hidden_layers
    monkeypatch.setattr(_decoder, "_lora_group", lambda modules, x: None)
    loss_ref, grads_ref, calls_ref = run()
    assert calls_ref == 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_group_skips_hooked_and_mixed_projections():
    """A projection with a forward hook, or a group that is not all LoRA (targets q and v only),
    runs module by module: the hook fires and the outputs are the modules' own."""
    model = tiny_llama()
    peft.apply_lora(model, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], r=4, init=False)
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids, labels = successor_task(128, batch=2)
    with torch.profiler.profile() as prof:
        model.loss(ids, labels)
    names = [e.name for e in prof.events()]
    # only the gate/up groups of the layers without the hook are grouped
    assert names.count("fastllm::lora_linear_group") == model.config.num_hidden_layers - 1
    assert len(seen) == 1
