"""Cross-entropy from logits against the reference (and the reference against
F.cross_entropy), for every backend: values and the logits' gradient, all options,
ignored rows and batches, huge logits, bf16, gradcheck and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops import cross_entropy, cross_entropy_reference
from tests.conftest import assert_close, assert_lowp_rule, compiled_backends

BACKENDS = compiled_backends("cpu")
OPTIONS = {
    "plain": {},
    "smooth+zloss+softcap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
}


def _inputs(N, V, dtype=torch.float32, scale=2.0, ignored_every=4):
    logits = (torch.randn(N, V) * scale).to(dtype)
    labels = torch.randint(0, V, (N,))
    if ignored_every:
        labels[::ignored_every] = -100
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("V", [101, 257])
def test_matches_reference(backend, reduction, opts, V):
    logits, labels = _inputs(37, V)
    kw = dict(reduction=reduction, **OPTIONS[opts])
    x = logits.clone().requires_grad_(True)
    ours = cross_entropy(x, labels, backend=backend, **kw)
    x2 = logits.clone().requires_grad_(True)
    ref = cross_entropy_reference(x2, labels, **kw)
    assert_close(ours, ref)
    g = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.3)
    assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x2, g)[0])
    assert torch.equal(x, logits)  # the input logits are left alone


def test_reference_matches_torch():
    logits, labels = _inputs(37, 101)
    for reduction in ("mean", "sum", "none"):
        for ls in (0.0, 0.3):
            assert_close(cross_entropy_reference(logits, labels, reduction=reduction, label_smoothing=ls),
                         F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=ls))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    logits, labels = _inputs(4 if backend == "triton" else 6, 11, dtype=torch.float64)
    x = logits.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, reduction=reduction: cross_entropy(x, labels, reduction=reduction, label_smoothing=0.2,
                                                         z_loss=0.01, softcap=3.0, backend=backend),
            (x,), eps=1e-6, atol=1e-7,
            fast_mode=backend == "triton")  # the Triton interpreter is slow


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    logits, labels = _inputs(7, 13)
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels, backend=backend)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend):
    logits, labels = _inputs(9, 50, scale=1e4)
    x = logits.clone().requires_grad_(True)
    ours = cross_entropy(x, labels, backend=backend)
    x2 = logits.clone().requires_grad_(True)
    ref = cross_entropy_reference(x2, labels)
    assert torch.isfinite(ours)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x2)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    logits, labels = _inputs(37, 257, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    ours = cross_entropy(x, labels, backend=backend)
    (g_ours,) = torch.autograd.grad(ours, x)
    x32 = logits.float().requires_grad_(True)
    ref = cross_entropy_reference(x32, labels)
    (g_ref,) = torch.autograd.grad(ref, x32)
    xl = logits.clone().requires_grad_(True)
    low = F.cross_entropy(xl, labels)
    (g_low,) = torch.autograd.grad(low, xl)
    assert g_ours.dtype == torch.bfloat16
    assert_lowp_rule(ours.bfloat16(), low, ref, "loss")
    assert_lowp_rule(g_ours, g_low, g_ref, "grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits, labels = _inputs(5, 11, dtype=torch.float64)
    x = logits.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastllm.cross_entropy_rows, (x, labels, -100, 0.1, 0.01, 3.0, backend))
    torch.library.opcheck(torch.ops.fastllm.cross_entropy_backward,
                          (torch.randn(5, dtype=torch.float64), logits.detach(), labels, -100, 0.1, 0.01, 3.0, backend))


def test_3d_logits_and_errors():
    logits, labels = _inputs(2 * 5, 11, ignored_every=0)
    ours = cross_entropy(logits.view(2, 5, 11), labels.view(2, 5), reduction="none")
    assert ours.shape == (2, 5)
    assert_close(ours.reshape(-1), F.cross_entropy(logits, labels, reduction="none"))
    with pytest.raises(ValueError, match="labels: expected values in \\[0, 11\\)"):
        cross_entropy(logits, torch.full((10,), -1))
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.5)
