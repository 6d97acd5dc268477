"""RoPE: every backend against the reference (outputs and both input gradients), float64
gradcheck, opcheck, Llama-3 frequency scaling, packed positions and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from fastllm.ops import apply_rope, rope_cos_sin, rope_inv_freq, rope_reference
from fastllm.ops.rope import rope_backward_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule, compiled_backends

BACKENDS = compiled_backends("cpu")
BACKEND_DEVICE = [
    pytest.param(b, d, marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in DEVICES
    for b in compiled_backends(d)
]
# (B, T, Hq, Hkv, D): odd token counts, GQA, head_dim 80 (half 40: not a power of two)
SHAPES = [(1, 1, 1, 1, 2), (2, 5, 4, 2, 16), (1, 123, 3, 1, 80), (3, 7, 8, 8, 64)]


def _inputs(B, T, Hq, Hkv, D, dtype, device="cpu"):
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, T, Hkv, D, dtype=dtype, device=device)
    pos = torch.randint(0, 4096, (B, T), device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(rope_inv_freq(D, 10000.0), pos, acc)
    return q, k, cos, sin


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_float32(backend, device, shape):
    q, k, cos, sin = _inputs(*shape, torch.float32, device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    rq, rk = rope_reference(q.detach(), k.detach(), cos, sin)
    assert_close(qo, rq)
    assert_close(ko, rk)
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq_out, dk_out))
    eq, ek = rope_backward_reference(dq_out, dk_out, cos, sin)
    assert_close(q.grad, eq)
    assert_close(k.grad, ek)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_autograd_of_reference(backend):
    # The closed-form backward (inverse rotation) equals autograd through the reference.
    q, k, cos, sin = _inputs(2, 9, 4, 2, 32, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    rq, rk = rope_reference(q, k, cos, sin)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    eq, ek = torch.autograd.grad((rq, rk), (q, k), (gq, gk))
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    aq, ak = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    assert_close(aq, eq)
    assert_close(ak, ek)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(backend, device, dtype):
    q, k, cos, sin = _inputs(2, 33, 4, 2, 80, torch.float32, device)
    rq, rk = rope_reference(q, k, cos, sin)  # float32 reference
    ql, kl = q.to(dtype), k.to(dtype)
    tq, tk = rope_reference(
        ql, kl, cos.to(dtype), sin.to(dtype), upcast=False
    )  # torch in low precision
    oq, ok = apply_rope(ql, kl, cos, sin, backend=backend)
    assert oq.dtype == dtype and ok.dtype == dtype
    assert_lowp_rule(oq, tq, rq, "q")
    assert_lowp_rule(ok, tk, rk, "k")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    q, k, cos, sin = _inputs(1, 4, 2, 1, 6, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rope(a, b, cos, sin, backend=backend), (q, k)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_layout_restarting_positions(backend):
    # Packed tokens (N, H, D) whose positions restart at 0 for each sequence give the same
    # result as rotating each sequence on its own.
    lengths = [5, 3, 7]
    pos = torch.cat([torch.arange(n) for n in lengths])
    N, D = pos.numel(), 16
    q, k = torch.randn(N, 4, D), torch.randn(N, 2, D)
    cos, sin = rope_cos_sin(rope_inv_freq(D), pos)
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    start = 0
    for n in lengths:
        c, s = rope_cos_sin(rope_inv_freq(D), torch.arange(n))
        rq, rk = rope_reference(q[start : start + n], k[start : start + n], c, s)
        assert_close(qo[start : start + n], rq)
        assert_close(ko[start : start + n], rk)
        start += n


def test_position_zero_is_identity_and_rotation_is_relative():
    D = 8
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
    inv = rope_inv_freq(D)
    c, s = rope_cos_sin(inv, torch.zeros(1, 2, dtype=torch.long))
    qo, ko = apply_rope(q, k, c, s)
    assert_close(qo, q)

    # <rot(q, m), rot(k, n)> depends only on m - n
    def dot(m, n):
        cq, sq = rope_cos_sin(inv, torch.tensor([[m]]))
        ck, sk = rope_cos_sin(inv, torch.tensor([[n]]))
        a, _ = apply_rope(q[:, :1], k[:, :1], cq, sq)
        _, b = apply_rope(q[:, :1], k[:, :1], ck, sk)
        return (a * b).sum()

    assert_close(dot(7, 3), dot(104, 100))


def test_llama3_scaling_matches_formula():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, scaling)
    for b, s in zip(base.tolist(), scaled.tolist(), strict=True):
        wavelen = 2 * math.pi / b
        if wavelen < 8192 / 4.0:
            expect = b
        elif wavelen > 8192 / 1.0:
            expect = b / 8.0
        else:
            t = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expect = (1 - t) * b / 8.0 + t * b
        assert s == pytest.approx(expect, rel=1e-6)
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_poisoned_outputs_fully_written(backend, monkeypatch):
    monkeypatch.setenv("FASTLLM_POISON", "1")
    q, k, cos, sin = _inputs(2, 3, 5, 3, 10, torch.float32)
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    assert torch.isfinite(qo).all() and torch.isfinite(ko).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, cos, sin = _inputs(2, 5, 4, 2, 16, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastllm.rope.default, (q, k, cos, sin, backend))
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    torch.library.opcheck(torch.ops.fastllm.rope_backward.default, (dq, dk, cos, sin, backend))


def test_opcheck_native_kernel():
    if "native" not in BACKENDS:
        pytest.fail("the compiled extension should be built for the tests")
    q, k, cos, sin = _inputs(1, 6, 3, 1, 10, torch.float32)
    torch.library.opcheck(
        torch.ops.fastllm.rope_fwd.default,
        (q.view(6, 3, 10), k.view(6, 1, 10), cos.view(6, 5), sin.view(6, 5), True),
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, cos, sin = _inputs(2, 5, 4, 2, 16, torch.float32)

    def f(a, b):
        qa, kb = apply_rope(a * 2, b, cos, sin, backend="native")
        return (qa.sum(-1) ** 2).sum() + (kb**2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    ga = torch.autograd.grad(compiled(a, b), (a, b))
    ea = torch.autograd.grad(f(a, b), (a, b))
    for x, y in zip(ga, ea, strict=True):
        assert_close(x, y)


def test_errors_name_the_argument():
    q, k, cos, sin = _inputs(1, 4, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="k: expected shape"):
        apply_rope(q, torch.randn(1, 4, 1, 6), cos, sin)
    with pytest.raises(ValueError, match="cos: expected shape"):
        apply_rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="even head dimension"):
        apply_rope(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 1, 7), cos, sin)
    with pytest.raises(TypeError, match="k: expected dtype"):
        apply_rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(7)
