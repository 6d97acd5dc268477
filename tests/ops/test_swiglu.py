"""SwiGLU: every backend against the reference (output and both gradients), float64
gradcheck, opcheck, low-precision rule and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops import swiglu, swiglu_backward_reference, swiglu_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule, compiled_backends

BACKENDS = compiled_backends("cpu")
BACKEND_DEVICE = [
    pytest.param(b, d, marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in DEVICES
    for b in compiled_backends(d)
]
SHAPES = [(1,), (5, 123), (3, 7, 1000), (2, 1537)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_float32(backend, device, shape):
    g = (torch.randn(shape, device=device) * 4).requires_grad_(
        True
    )  # wide range: both sigmoid tails
    u = torch.randn(shape, device=device).requires_grad_(True)
    y = swiglu(g, u, backend=backend)
    assert_close(y, swiglu_reference(g.detach(), u.detach()))
    dy = torch.randn_like(y)
    y.backward(dy)
    eg, eu = swiglu_backward_reference(dy, g.detach(), u.detach())
    assert_close(g.grad, eg)
    assert_close(u.grad, eu)


def test_closed_form_backward_equals_autograd():
    g = torch.randn(64, dtype=torch.float64, requires_grad=True)
    u = torch.randn(64, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(64, dtype=torch.float64)
    eg, eu = torch.autograd.grad(F.silu(g) * u, (g, u), dy)
    rg, ru = swiglu_backward_reference(dy, g.detach(), u.detach())
    assert_close(rg, eg)
    assert_close(ru, eu)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(backend, device, dtype):
    g32, u32 = torch.randn(17, 301, device=device) * 3, torch.randn(17, 301, device=device)
    dy32 = torch.randn(17, 301, device=device)
    ref = swiglu_reference(g32, u32)
    g, u, dy = g32.to(dtype), u32.to(dtype), dy32.to(dtype)
    assert_lowp_rule(swiglu(g, u, backend=backend), swiglu_reference(g, u, upcast=False), ref)
    gl = g.clone().requires_grad_(True)
    ul = u.clone().requires_grad_(True)
    swiglu(gl, ul, backend=backend).backward(dy)
    eg, eu = swiglu_backward_reference(dy32, g32, u32)
    # torch's own low-precision backward: autograd through silu * up in `dtype`
    gt, ut = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    (F.silu(gt) * ut).backward(dy)
    assert_lowp_rule(gl.grad, gt.grad, eg, "grad gate")
    assert_lowp_rule(ul.grad, ut.grad, eu, "grad up")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    g = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: swiglu(a, b, backend=backend), (g, u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gu = torch.randn(6, 2 * 50)
    g, u = gu[:, :50], gu[:, 50:]  # views of a fused gate/up projection
    assert_close(swiglu(g, u, backend=backend), swiglu_reference(g, u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.randn(4, 33, requires_grad=True)
    u = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.swiglu.default, (g, u, backend))
    dy = torch.randn(4, 33)
    torch.library.opcheck(
        torch.ops.fastllm.swiglu_backward.default, (dy, g.detach(), u.detach(), backend)
    )


def test_opcheck_native_kernels():
    if "native" not in BACKENDS:
        pytest.fail("the compiled extension should be built for the tests")
    g, u, dy = torch.randn(5, 40), torch.randn(5, 40), torch.randn(5, 40)
    torch.library.opcheck(torch.ops.fastllm.swiglu_fwd.default, (g, u))
    torch.library.opcheck(torch.ops.fastllm.swiglu_bwd.default, (dy, g, u))


def test_torch_compile_fullgraph_mlp():
    torch._dynamo.reset()
    gate, up = torch.nn.Linear(16, 40), torch.nn.Linear(16, 40)

    def mlp(x):
        return swiglu(gate(x), up(x), backend="native").sum(-1)

    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16)
    got = torch.autograd.grad(compiled(x).sum(), list(gate.parameters()) + list(up.parameters()))
    exp = torch.autograd.grad(mlp(x).sum(), list(gate.parameters()) + list(up.parameters()))
    for a, b in zip(got, exp, strict=True):
        assert_close(a, b)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="up: expected shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up: expected dtype"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="gate: expected dtype"):
        swiglu(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        swiglu(torch.randn(3), torch.randn(3), backend="cuda")
