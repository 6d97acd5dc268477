"""RoPE + KV-cache append: every backend against the reference, which in turn equals the
model's own RoPE (fastllm.ops.rope) at the same positions; only the addressed cache slots
change."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm.ops import rope_cos_sin, rope_inv_freq, rope_reference
from fastllm.ops.kv_append_rope import kv_append_rope, kv_append_rope_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule

BACKENDS = ["reference"] + (["native"] if fastllm.extension_available() else [])
PARAMS = [pytest.param(b, d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES for b in BACKENDS]


def _inputs(B, Hq, Hkv, D, S, dtype, device):
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, D, dtype=dtype, device=device)
    kc = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    vc = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    pos = torch.randint(0, S, (B,), dtype=torch.int32)
    pos[0] = S - 1
    return q, k, v, kc, vc, pos.to(device), rope_inv_freq(D, 10000.0).to(device)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("shape", [(3, 6, 2, 16, 37), (1, 4, 4, 80, 5), (5, 9, 3, 64, 2000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, device, shape, dtype):
    if dtype == torch.float64 and device == "cuda" and backend == "native":
        pytest.skip("the CUDA kernel has no float64 variant")
    q, k, v, kc, vc, pos, inv = _inputs(*shape, dtype, device)
    kc2, vc2 = kc.clone(), vc.clone()
    untouched = kc.clone()
    out = kv_append_rope(q, k, v, kc, vc, pos, inv, backend=backend)
    want = kv_append_rope_reference(q, k, v, kc2, vc2, pos, inv)
    assert_close(out, want)
    assert_close(kc, kc2)
    assert torch.equal(vc, vc2)
    written = torch.zeros(kc.shape[:2], dtype=torch.bool, device=device)
    written[torch.arange(shape[0], device=device), pos.long()] = True
    assert torch.equal(kc[~written], untouched[~written])


def test_reference_equals_model_rope():
    q, k, v, kc, vc, pos, inv = _inputs(4, 6, 2, 32, 300, torch.float32, "cpu")
    out = kv_append_rope_reference(q, k, v, kc, vc, pos, inv)
    cos, sin = rope_cos_sin(inv, pos.long()[:, None])  # (B, 1, D/2)
    q_want, k_want = rope_reference(q[:, None], k[:, None], cos, sin)
    torch.testing.assert_close(out, q_want[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(kc[torch.arange(4), pos.long()], k_want[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(backend, device, dtype):
    q, k, v, kc, vc, pos, inv = _inputs(5, 9, 3, 64, 100, dtype, device)
    ref = kv_append_rope_reference(q.float(), k.float(), v.float(), kc.float(), vc.float(), pos, inv)
    lowq = q.clone()
    x1, x2 = lowq.chunk(2, -1)
    ang = pos.float()[:, None] * inv
    c, s = ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]
    lowp = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert_lowp_rule(kv_append_rope(q, k, v, kc, vc, pos, inv, backend=backend), lowp, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = _inputs(3, 6, 2, 16, 9, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastllm.kv_append_rope.default, (*args, backend))
    if backend == "native":
        torch.library.opcheck(torch.ops.fastllm.kv_append_rope_fwd.default,
                              _inputs(3, 6, 2, 16, 9, torch.float32, "cpu"))


def test_errors_name_the_argument():
    q, k, v, kc, vc, pos, inv = _inputs(3, 6, 2, 16, 9, torch.float32, "cpu")
    with pytest.raises(ValueError, match="inv_freq"):
        kv_append_rope(q, k, v, kc, vc, pos, inv[:4])
    with pytest.raises(TypeError, match="positions"):
        kv_append_rope(q, k, v, kc, vc, pos.long(), inv)
    with pytest.raises(ValueError, match="k_cache"):
        kv_append_rope(q, k, v, kc[:, :, :1], vc[:, :, :1], pos, inv)
    if fastllm.extension_available():
        with pytest.raises(RuntimeError, match="positions"):
            kv_append_rope(q, k, v, kc, vc, torch.tensor([0, 9, 1], dtype=torch.int32), inv, backend="native")
