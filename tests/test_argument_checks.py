"""Arguments that used to be silent no-ops (or failed deep inside an op) now fail at the call,
naming the argument, what was expected and what came."""

import pytest
import torch

from fastllm.generation import generate
from fastllm.models import build_model, preset
from fastllm.ops.attention import attention
from fastllm.peft import apply_lora


def _model():
    torch.manual_seed(0)
    return build_model(preset("tiny-llama", vocab_size=97)).eval()


@pytest.mark.parametrize("alpha", [0, 0.0, float("nan"), "16"])
def test_lora_alpha_that_trains_nothing(alpha):
    with pytest.raises(ValueError, match=r"alpha: expected a finite non-zero number .*alpha / r"):
        apply_lora(_model(), alpha=alpha)


def test_lora_other_arguments():
    with pytest.raises(ValueError, match=r"r: expected a positive integer, got True"):
        apply_lora(_model(), r=True)
    with pytest.raises(ValueError, match=r"target_modules: expected module-name suffixes .*got 3"):
        apply_lora(_model(), target_modules=3)
    model = _model()
    apply_lora(model, alpha=-8, r=4)  # a negative scale still trains
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"stop_token_ids": [5, 97]}, r"stop_token_ids: expected token ids in \[0, 97\) \(vocab_size\), got \[97\]"),
    ({"stop_token_ids": torch.tensor([-1])}, r"stop_token_ids: expected token ids in \[0, 97\).*got \[-1\]"),
    ({"temperature": torch.tensor([1.0, -0.5])}, r"temperature: expected values >= 0 .*got a minimum of -0\.5"),
    ({"pad_token_id": 97}, r"pad_token_id: expected a token id in \[0, 97\) \(vocab_size\), got 97"),
    ({"pad_token_id": -1}, r"pad_token_id: expected a token id in \[0, 97\).*got -1"),
    ({"top_k": torch.tensor([3, -1])}, r"top_k: expected integers >= 0 \(0: off\), got a minimum of -1"),
    ({"top_p": torch.tensor([0.9, 1.5])}, r"top_p: expected values in \(0, 1\] .*to 1\.5"),
    ({"top_p": torch.tensor([0.0, 0.5])}, r"top_p: expected values in \(0, 1\] .*from 0\.0"),
    ({"top_p": 1.5}, r"top_p: expected a value in \(0, 1\] \(1: off\), got 1\.5"),
])
def test_generate_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(_model(), [[1, 2, 3], [4, 5]], 4, backend="reference", **kwargs)


def test_generate_accepts_edge_values():
    out = generate(_model(), [[1, 2, 3], [4, 5]], 3, backend="reference", stop_token_ids=[0, 96],
                   temperature=torch.tensor([0.0, 1.0]), pad_token_id=96)
    assert out.tokens.shape == (2, 6)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("cu, message", [
    ([0, 4, 12], r"cu_seqlens: expected the last offset to equal the number of rows of q and k \(10, 10\), got 12"),
    ([0, 4, 8], r"cu_seqlens: expected the last offset .*got 8"),
    ([2, 4, 10], r"cu_seqlens: expected offsets starting at 0, got \[2, 4, 10\]"),
    ([0, 6, 4, 10], r"cu_seqlens: expected non-decreasing offsets, got 6 then 4 at index 1"),
])
def test_cu_seqlens_checked_by_every_backend(backend, cu, message):
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32), causal=True, backend=backend)
    with pytest.raises(ValueError, match=r"max_seqlen: expected at least the longest sequence, 6, got 3"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=3, backend=backend)
