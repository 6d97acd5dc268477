"""Parity with Hugging Face transformers, in both directions, for every architecture:

HF -> fastllm: a randomly initialised transformers model (small config) is saved, loaded
    with fastllm.models.from_pretrained and both give the same logits (float32: max abs
    diff <= 1e-4; bfloat16: our error against the float32 logits is at most 2x that of
    transformers run in bfloat16, plus 1e-2), and for Llama and GPT-2 the same loss and
    parameter gradients (float32, max abs diff <= 1e-4 relative to the gradient's scale).
fastllm -> HF: a fastllm model is saved with save_pretrained, loaded by transformers,
    and gives the same logits.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import assert_lowp_rule

transformers = pytest.importorskip("transformers")

from fastllm.labels import next_token_labels  # noqa: E402
from fastllm.models import build_model, from_pretrained, preset, save_pretrained  # noqa: E402

FP32_TOL = 1e-4
CAUSAL = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
ALL = CAUSAL + ["tiny-bert"]


def _hf_class(name):
    return (
        transformers.AutoModelForMaskedLM
        if name == "tiny-bert"
        else transformers.AutoModelForCausalLM
    )


def _hf_model(name, dtype=torch.float32):
    cfg = preset(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    torch.manual_seed(1)
    model = _hf_class(name).from_config(hf_cfg).to(dtype).eval()
    # HF initialises norms to ones and biases to zero: perturb them so the test sees them.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or pname.endswith("bias") or ".ln_" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _our_logits(model, name, ids, **kw):
    hidden = model(ids, **kw)
    return model.mlm_head(hidden) if name == "tiny-bert" else model.logits(hidden)


def _ids(vocab=128, B=2, T=37):
    return torch.randint(0, vocab, (B, T))


@pytest.mark.parametrize("name", ALL)
def test_hf_to_fastllm_float32(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        actual = _our_logits(ours, name, ids)
    assert actual.dtype == torch.float32
    assert (actual - expected).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("name", ALL)
def test_hf_to_fastllm_bfloat16(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref32 = hf(ids).logits
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits
        ours = from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        assert ours.lm_head_weight.dtype == torch.bfloat16 if name != "tiny-bert" else True
        actual = _our_logits(ours, name, ids)
    assert actual.dtype == torch.bfloat16
    assert_lowp_rule(actual, hf_bf16, ref32, f"{name} bf16 logits")


@pytest.mark.parametrize("name", ALL)
def test_fastllm_to_hf(name, tmp_path):
    torch.manual_seed(2)
    ours = build_model(preset(name)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(ours, tmp_path)
    hf = _hf_class(name).from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        expected = _our_logits(ours, name, ids)
        actual = hf(ids).logits
    assert (actual - expected).abs().max().item() <= FP32_TOL


def _gpt2_grad_name(name, grad):
    # fastllm keeps nn.Linear (out, in); HF's Conv1D stores (in, out)
    if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
        return grad.t()
    return grad


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-gpt2"])
def test_loss_and_gradients_match(name, tmp_path):
    hf = _hf_model(name)  # eval(): GPT-2's dropout off; gradients still flow
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = _ids()
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions
    hf_loss = hf(ids, labels=labels).loss
    hf_loss.backward()
    loss = ours.loss(ids, next_token_labels(ids, labels=labels))  # HF shifts inside; we shift once, here
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= FP32_TOL
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = 0
    for n, p in ours.named_parameters():
        g_hf = hf_grads[n]
        g = _gpt2_grad_name(n, p.grad) if name == "tiny-gpt2" else p.grad
        scale = max(g_hf.abs().max().item(), 1e-3)
        assert (g - g_hf).abs().max().item() <= FP32_TOL * scale, n
        checked += 1
    assert checked == len(list(ours.parameters()))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_padding_mask_matches_hf(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    ids = _ids(T=12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        actual = _our_logits(ours, name, ids, attention_mask=mask)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= FP32_TOL


def test_bert_token_types_match_hf(tmp_path):
    hf = _hf_model("tiny-bert")
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    ids, types = _ids(T=10), torch.randint(0, 2, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    with torch.no_grad():
        out = hf(ids, token_type_ids=types, labels=labels)
        actual = ours.mlm_head(ours(ids, token_type_ids=types))
        loss = ours.mlm_loss(ids, labels, token_type_ids=types)
    assert (actual - out.logits).abs().max().item() <= FP32_TOL
    assert abs(loss.item() - out.loss.item()) <= FP32_TOL
