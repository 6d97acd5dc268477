"""Fused sampling: kernels agree with the reference draw for draw, the draws follow the
stated distribution (chi-square on a small vocabulary), top-k/top-p never emit a filtered
token, greedy is the first argmax, and log-probs are log_softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm.ops.sampling import _keep_mask, sample, sample_reference, sampling_distribution_reference, sampling_params
from tests.conftest import DEVICES

BACKENDS = ["reference"] + (["native"] if fastllm.extension_available() else [])
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in BACKENDS]


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


PARAMS = [pytest.param(b, d, marks=_marks(d)) for b, d in BACKEND_DEVICE]


def _mixed_params(B, V, device):
    """Per-row temperature / top-k / top-p covering every combination, greedy included."""
    g = torch.Generator().manual_seed(1)
    t = torch.rand(B, generator=g) * 1.5 + 0.2
    t[::7] = 0.0  # greedy rows
    k = torch.randint(0, V + 3, (B,), generator=g, dtype=torch.int32)
    k[::3] = 0
    p = torch.rand(B, generator=g) * 0.9 + 0.05
    p[::4] = 1.0
    return sampling_params(B, device, t.to(device), k.to(device), p.to(device))


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("B,V", [(64, 128), (9, 1000), (3, 50257)])
def test_matches_reference_draw_for_draw(backend, device, B, V):
    logits = torch.randn(B, V, device=device) * 3
    params = _mixed_params(B, V, device)
    uniforms = torch.rand(B, device=device)
    tokens, logprobs = sample(logits, *params, uniforms=uniforms, backend=backend)
    ref_tokens, ref_logprobs = sample_reference(logits, *params, uniforms)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_logprob_is_temperature_scaled_log_softmax(backend, device):
    B, V = 16, 128
    logits = torch.randn(B, V, device=device) * 2
    t = torch.linspace(0.3, 2.0, B, device=device)
    tokens, logprobs = sample(logits, t, 20, 0.8, generator=torch.Generator(device).manual_seed(0), backend=backend)
    want = torch.log_softmax(logits.double() / t.double()[:, None], -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_greedy_is_first_argmax(backend, device):
    logits = torch.randn(6, 50, device=device)
    logits[2, 7] = logits[2, 30] = 10.0  # a tie: the first index wins
    tokens, logprobs = sample(logits, 0.0, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))
    assert int(tokens[2]) == 7
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("backend,device", PARAMS)
def test_greedy_first_argmax_in_blocks_and_tail(backend, device):
    """The native kernel finds the first maximum 16 values at a time, then within the block:
    ties inside one block, across blocks, in the tail after the last whole block (70 = 4 * 16 + 6),
    the last value, and rows of -inf (the first index)."""
    logits = torch.randn(7, 70, device=device)
    logits[0, 3] = logits[0, 9] = 9.0          # one block
    logits[1, 31] = logits[1, 32] = 9.0        # across a block boundary
    logits[2, 65] = logits[2, 68] = 9.0        # the tail
    logits[3, 69] = 9.0                        # the last value
    logits[4, 15] = logits[4, 64] = 9.0        # a block's last value, then the tail's first
    logits[5] = float("-inf")
    logits[6, 0] = 9.0
    tokens, _ = sample(logits, 0.0, backend=backend)
    assert tokens.tolist() == [3, 31, 65, 69, 15, 0, 0]


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    support = probs > 0
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8),
                                                     (0.9, 6, 0.9)])
def test_chi_square_on_small_vocabulary(backend, device, temperature, top_k, top_p):
    V, N = 10, 40000
    row = torch.linspace(-1.5, 1.5, V, device=device)[torch.randperm(V, device=device)]
    logits = row.expand(N, V).contiguous()
    gen = torch.Generator(device).manual_seed(1234)
    tokens, _ = sample(logits, temperature, top_k, top_p, generator=gen, backend=backend)
    counts = torch.bincount(tokens.cpu(), minlength=V).double()
    probs = sampling_distribution_reference(logits[:1], *sampling_params(1, device, temperature, top_k, top_p))[0]
    probs = probs.cpu()
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    assert _chi_square_pvalue(counts, probs) > 1e-3
    # and the test can fail: the same draws judged against the unfiltered T=1 softmax
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):
        wrong = torch.softmax(row.double().cpu(), -1)
        assert _chi_square_pvalue(counts, wrong) < 1e-6


@pytest.mark.parametrize("backend,device", PARAMS)
def test_top_k_top_p_never_emit_filtered_tokens(backend, device):
    B, V = 256, 128
    logits = torch.randn(B, V, device=device) * 4
    t, k, p = _mixed_params(B, V, device)
    keep = _keep_mask(logits / torch.where(t > 0, t, torch.ones_like(t))[:, None], k, p)
    for seed in range(4):
        tokens, _ = sample(logits, t, k, p, generator=torch.Generator(device).manual_seed(seed), backend=backend)
        assert keep.gather(-1, tokens[:, None]).all()
    # the filters do what they say on distinct values: top-k keeps k, top-p the smallest nucleus
    kk = k.long().clamp(max=V)
    sampled_rows = (t > 0) & (kk > 0) & (p >= 1)
    assert torch.equal(keep.sum(-1)[sampled_rows], kk[sampled_rows])
    probs = torch.softmax(logits.double(), -1)
    keep_p = _keep_mask(logits, torch.zeros(B, dtype=torch.int32, device=device), torch.full((B,), 0.6, device=device))
    kept_mass = (probs * keep_p).sum(-1)
    smallest_kept = probs.masked_fill(~keep_p, 2.0).min(-1).values
    assert (kept_mass >= 0.6 - 1e-9).all() and (kept_mass - smallest_kept < 0.6).all()


@pytest.mark.parametrize("backend,device", PARAMS)
def test_ties_at_the_boundary_are_kept(backend, device):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], device=device).expand(4000, 6).contiguous()
    tokens, _ = sample(logits, 1.0, 2, generator=torch.Generator(device).manual_seed(0), backend=backend)
    drawn = set(torch.unique(tokens).tolist())
    assert drawn == {0, 2, 3, 5}


@pytest.mark.parametrize("backend,device", PARAMS)
def test_generator_makes_draws_reproducible(backend, device):
    logits = torch.randn(32, 77, device=device)
    a = sample(logits, 1.0, generator=torch.Generator(device).manual_seed(5), backend=backend)[0]
    b = sample(logits, 1.0, generator=torch.Generator(device).manual_seed(5), backend=backend)[0]
    c = sample(logits, 1.0, generator=torch.Generator(device).manual_seed(6), backend=backend)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits = torch.randn(5, 33)
    params = _mixed_params(5, 33, "cpu")
    torch.library.opcheck(torch.ops.fastllm.sample.default, (logits, *params, torch.rand(5), backend))
    if backend == "native":
        torch.library.opcheck(torch.ops.fastllm.sample_tokens.default, (logits, *params, torch.rand(5)))


def test_errors_name_the_argument():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, 1.0, 2.5)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0, torch.ones(3))
    with pytest.raises(TypeError, match="logits"):
        torch.ops.fastllm.sample(logits.double(), *sampling_params(4, "cpu"), torch.rand(4), "auto")
