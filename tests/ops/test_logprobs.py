"""Per-token log-probs and entropy from hidden states against the full-logits reference,
for every backend: both outputs and the gradients of hidden, weight and bias, with a
temperature, ignored targets, bf16, gradcheck and opcheck."""

from __future__ import annotations

import pytest
import torch

from fastllm.ops import token_logprobs, token_logprobs_and_entropy, token_logprobs_and_entropy_reference
from tests.conftest import assert_close, assert_lowp_rule, compiled_backends

BACKENDS = compiled_backends("cpu")


def _inputs(N, H, V, dtype=torch.float32, scale=None):
    hidden = torch.randn(N, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype) * (scale if scale is not None else 2 * H ** -0.5)
    bias = torch.randn(V, dtype=dtype) * 0.1
    targets = torch.randint(0, V, (N,))
    targets[3::7] = -100
    return hidden, weight, bias, targets


def _req(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(37, 24, 101), (19, 16, 257)], ids=["37x24x101", "19x16x257"])
def test_matches_reference(backend, temperature, shape):
    hidden, weight, bias, targets = _inputs(*shape)
    h, w, b = _req(hidden, weight, bias)
    lp, ent = token_logprobs_and_entropy(h, w, targets, temperature=temperature, bias=b, chunk_size=8,
                                         backend=backend)
    h2, w2, b2 = _req(hidden, weight, bias)
    lp_ref, ent_ref = token_logprobs_and_entropy_reference(h2, w2, targets, temperature=temperature, bias=b2)
    assert_close(lp, lp_ref)
    assert_close(ent, ent_ref)
    assert (lp[targets == -100] == 0).all()
    g, k = torch.randn_like(lp), torch.randn_like(ent)
    ours = torch.autograd.grad((lp * g).sum() + (ent * k).sum(), (h, w, b))
    ref = torch.autograd.grad((lp_ref * g).sum() + (ent_ref * k).sum(), (h2, w2, b2))
    for name, a, e in zip(("hidden", "weight", "bias"), ours, ref):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_only_gradient_3d(backend):
    hidden, weight, _, targets = _inputs(2 * 13, 16, 101)
    hidden, targets = hidden.view(2, 13, 16), targets.view(2, 13)
    h, w = _req(hidden, weight)
    lp = token_logprobs(h, w, targets, backend=backend)
    assert lp.shape == (2, 13)
    h2, w2 = _req(hidden, weight)
    lp_ref, _ = token_logprobs_and_entropy_reference(h2, w2, targets)
    assert_close(lp, lp_ref)
    for a, e in zip(torch.autograd.grad(lp.sum(), (h, w)), torch.autograd.grad(lp_ref.sum(), (h2, w2))):
        assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    shape = (4, 3, 7) if backend == "triton" else (7, 5, 13)
    hidden, weight, bias, targets = _inputs(*shape, dtype=torch.float64)
    h, w, b = _req(hidden, weight, bias)

    def fn(h, w, b):
        return token_logprobs_and_entropy(h, w, targets, temperature=0.8, bias=b, chunk_size=3, backend=backend)

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    hidden, weight, bias, targets = [t.bfloat16() if t.is_floating_point() else t for t in _inputs(37, 32, 257)]
    h, w = _req(hidden, weight)
    lp, ent = token_logprobs_and_entropy(h, w, targets, bias=bias, chunk_size=8, backend=backend)
    g_ours = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    h32, w32 = _req(hidden.float(), weight.float())
    lp_ref, ent_ref = token_logprobs_and_entropy_reference(h32, w32, targets, bias=bias.float())
    g_ref = torch.autograd.grad(lp_ref.sum() + ent_ref.sum(), (h32, w32))
    hl, wl = _req(hidden, weight)
    logp = torch.log_softmax(hl @ wl.t() + bias, -1)  # PyTorch in bf16
    lp_low = torch.where(targets != -100, logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0], 0)
    ent_low = -(logp.exp() * logp).sum(-1)
    g_low = torch.autograd.grad(lp_low.sum() + ent_low.sum(), (hl, wl))
    assert_lowp_rule(lp.bfloat16(), lp_low, lp_ref, "logprob")
    assert_lowp_rule(ent.bfloat16(), ent_low, ent_ref, "entropy")
    for name, a, low, e in zip(("hidden", "weight"), g_ours, g_low, g_ref):
        assert_lowp_rule(a, low, e, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend):
    hidden, weight, bias, targets = _inputs(11, 8, 37, scale=3e3)
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, bias=bias, backend=backend)
    lp_ref, ent_ref = token_logprobs_and_entropy_reference(hidden, weight, targets, bias=bias)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert_close(lp, lp_ref)
    assert_close(ent, ent_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, targets = _inputs(9, 8, 21, dtype=torch.float64)
    h, w, b = _req(hidden, weight, bias)
    torch.library.opcheck(torch.ops.fastllm.token_logprobs_and_entropy, (h, w, targets, b, -100, 1.25, 4, backend))
    torch.library.opcheck(torch.ops.fastllm.token_logprobs_and_entropy_backward,
                          (torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64), hidden,
                           weight, targets, bias, -100, 1.25, 4, True, True, False, backend))


def test_errors():
    hidden, weight, bias, targets = _inputs(5, 8, 11)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets: expected values in \\[0, 11\\)"):
        token_logprobs_and_entropy(hidden, weight, torch.full((5,), 11))
