"""Fused sampling at the edges of the selection: ties at the top-k boundary, top_p at 1 or just
below it, a single-token nucleus, -inf logits, -0.0 against +0.0, vocabularies that are not a
multiple of the vector width, top_k >= V, and uniforms placed on the CDF boundaries (where a
float running sum cannot decide the draw and the kernel must decide it exactly). Every case is
compared draw for draw with `sample_reference`."""

from __future__ import annotations

import pytest
import torch

from fastllm.ops.sampling import _keep_mask, sample, sample_reference, sampling_params
from tests.ops.test_sampling import PARAMS

# The CUDA kernel scans float partial sums, so a uniform placed exactly on a CDF boundary may
# land one token off there; the exact-boundary tests hold the CPU kernel to the float64 draw.
CPU_PARAMS = [p for p in PARAMS if p.values[1] == "cpu"]


def _check_agrees(logits, t, k, p, uniforms, backend):
    tokens, logprobs = sample(logits, t, k, p, uniforms=uniforms, backend=backend)
    ref_tokens, ref_logprobs = sample_reference(logits, *sampling_params(logits.shape[0], logits.device, t, k, p),
                                                uniforms)
    assert torch.equal(tokens, ref_tokens), (tokens[tokens != ref_tokens], ref_tokens[tokens != ref_tokens])
    finite = ref_logprobs.isfinite()
    torch.testing.assert_close(logprobs[finite], ref_logprobs[finite], rtol=1e-5, atol=1e-5)
    return tokens


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("V", [1, 7, 9, 31, 1001, 4099])
def test_vocabulary_not_a_multiple_of_the_vector_width(backend, device, V):
    B = 24
    logits = torch.randn(B, V, device=device) * 2
    g = torch.Generator().manual_seed(V)
    t = (torch.rand(B, generator=g) + 0.3).to(device)
    k = torch.randint(0, V + 2, (B,), generator=g, dtype=torch.int32).to(device)
    p = (torch.rand(B, generator=g) * 0.9 + 0.1).to(device)
    p[::3] = 1.0
    _check_agrees(logits, t, k, p, torch.rand(B, device=device), backend)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_ties_at_the_top_k_boundary_on_a_large_vocabulary(backend, device):
    # Values on a coarse grid: hundreds of tokens share each value, so the k-th largest value
    # is tied with many tokens on both sides of rank k, and all of them are kept.
    B, V = 32, 5003
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(-40, 8, (B, V), generator=g).float() / 4).to(device)
    k = torch.randint(1, 400, (B,), generator=g, dtype=torch.int32).to(device)
    p = torch.ones(B, device=device)
    p[1::2] = 0.7
    t = torch.full((B,), 0.8, device=device)
    tokens = _check_agrees(logits, t, k, p, torch.rand(B, device=device), backend)
    keep = _keep_mask(logits / 0.8, k, p)
    kth = logits.sort(-1, descending=True).values.gather(-1, (k.long() - 1)[:, None])
    top_k_only = p >= 1
    assert torch.equal(keep[top_k_only], (logits >= kth)[top_k_only])  # ties with the k-th value kept
    assert (keep.sum(-1)[top_k_only] > k[top_k_only]).any()  # the grid makes ties actually happen
    assert keep.gather(-1, tokens[:, None]).all()


@pytest.mark.parametrize("backend,device", PARAMS)
def test_signed_zeros_tie(backend, device):
    # -0.0 and +0.0 are equal values: a threshold at 0 keeps both.
    row = torch.tensor([1.0, -0.0, 0.0, -1.0, -0.0, 2.0, 0.0, -3.0], device=device)
    logits = row.expand(64, 8).contiguous()
    tokens = _check_agrees(logits, torch.ones(64, device=device), torch.full((64,), 3, dtype=torch.int32,
                           device=device), torch.ones(64, device=device), torch.rand(64, device=device), backend)
    assert set(tokens.tolist()) <= {0, 1, 2, 4, 5, 6}


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("top_p", [1.0, 1.0 - 2.0**-24, 0.999999])
def test_top_p_reaching_one(backend, device, top_p):
    # top_p == 1 keeps everything, -inf included in the walk; just below 1 the nucleus is every
    # token with mass: the -inf tokens (no mass) fall out, and the thresholds sit within a
    # rounding of the kept mass.
    B, V = 40, 3001
    logits = torch.randn(B, V, device=device)
    logits[:, ::5] = float("-inf")
    uniforms = torch.rand(B, device=device)
    uniforms[:4] = torch.tensor([0.0, 1.0 - 2.0**-24, 0.5, 0.999], device=device)
    tokens = _check_agrees(logits, 1.0, 0, top_p, uniforms, backend)
    assert (tokens % 5 != 0).all()
    keep = _keep_mask(logits, torch.zeros(B, dtype=torch.int32, device=device), torch.full((B,), top_p, device=device))
    assert torch.equal(keep, logits.isfinite()) or top_p == 1.0


@pytest.mark.parametrize("backend,device", PARAMS)
def test_single_token_nucleus(backend, device):
    B, V = 16, 2049
    logits = torch.randn(B, V, device=device)
    winner = torch.randint(0, V, (B,), device=device)
    logits[torch.arange(B, device=device), winner] = 30.0
    for k, p in ((0, 0.5), (1, 1.0), (1, 0.5), (5, 0.9)):
        tokens = _check_agrees(logits, 1.0, k, p, torch.rand(B, device=device), backend)
        assert torch.equal(tokens, winner)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_minus_infinity_logits(backend, device):
    B, V = 12, 777
    logits = torch.randn(B, V, device=device) * 3
    logits[:, 100:] = float("-inf")  # fewer finite tokens than some top_k below
    logits[3, :] = float("-inf")
    logits[3, 500] = 0.0  # one finite token, far from the others' index range
    k = torch.tensor([0, 50, 99, 100, 150, 777, 1000, 1, 0, 0, 200, 3], dtype=torch.int32, device=device)
    p = torch.tensor([1, 1, 1, 1, 0.9, 0.8, 0.5, 1, 0.3, 0.999, 1, 1], device=device)
    tokens = _check_agrees(logits, 0.9, k, p, torch.rand(B, device=device), backend)
    assert logits.gather(-1, tokens[:, None]).isfinite().all()
    assert int(tokens[3]) == 500
    greedy, lp = sample(logits, 0.0, backend=backend)
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, greedy[:, None])[:, 0])


@pytest.mark.parametrize("backend,device", PARAMS)
def test_top_k_at_least_the_vocabulary(backend, device):
    B, V = 8, 1030
    logits = torch.randn(B, V, device=device)
    uniforms = torch.rand(B, device=device)
    unfiltered = sample(logits, 1.0, 0, 1.0, uniforms=uniforms, backend=backend)[0]
    for k in (V, V + 1, 2**31 - 1):
        assert torch.equal(_check_agrees(logits, 1.0, k, 1.0, uniforms, backend), unfiltered)
    _check_agrees(logits, 1.0, V - 1, 1.0, uniforms, backend)  # the smallest value dropped


@pytest.mark.parametrize("backend,device", CPU_PARAMS)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (40, 1.0), (40, 0.8)])
def test_uniforms_on_the_cdf_boundaries(backend, device, top_k, top_p):
    # u * total placed on (or one float step off) the running sums of the kept masses: the
    # draw is decided by the last bits of the sums, which a float running sum cannot resolve.
    V = 4096 + 3
    base = torch.randn(V, device=device) * 2
    params = sampling_params(1, device, 1.0, top_k, top_p)
    keep = _keep_mask(base[None], params[1], params[2])[0]
    e = (base - base.max()).double().exp() * keep
    cdf = e.cumsum(0)
    kept_at = keep.nonzero()[:, 0]
    picks = kept_at[torch.linspace(0, kept_at.numel() - 1, 40).long()]
    u = (cdf[picks] / cdf[-1]).float()
    u = torch.cat([u, torch.nextafter(u, torch.zeros_like(u)), torch.nextafter(u, torch.ones_like(u))])
    u = u.clamp(max=1.0 - 2.0**-24)
    logits = base.expand(u.numel(), V).contiguous()
    _check_agrees(logits, 1.0, top_k, top_p, u, backend)


@pytest.mark.parametrize("backend,device", CPU_PARAMS)
def test_top_p_boundary_on_a_running_mass(backend, device):
    # top_p chosen as the mass of the top r tokens: the nucleus threshold is decided by the last
    # bits of the running mass, on both sides of each such p.
    B, V = 30, 2500
    base = torch.randn(V, device=device) * 1.5
    ordered = base.sort(descending=True).values
    e = (ordered - ordered[0]).double().exp()
    frac = (e.cumsum(0) / e.sum())[torch.arange(1, 3 * B, 3)].float()
    p = torch.stack([frac, torch.nextafter(frac, torch.zeros_like(frac)),
                     torch.nextafter(frac, torch.ones_like(frac))], 1).flatten()[:B].to(device)
    logits = base.expand(B, V).contiguous()
    _check_agrees(logits, 1.0, 0, p, torch.rand(B, device=device), backend)
