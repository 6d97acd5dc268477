"""RMSNorm: every backend against the reference, outputs and both gradients."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm.ops import RMSNorm, rms_norm, rms_norm_backward_reference, rms_norm_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule, compiled_backends

# Odd shapes: rows not a multiple of any block, hidden sizes that are not powers of two.
SHAPES = [(1, 8), (5, 123), (3, 7, 80), (2, 3, 513), (37, 1000)]
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in compiled_backends(d)]


def _inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 0.5
    w = 1 + 0.5 * torch.randn(shape[-1], dtype=dtype, device=device)
    dy = torch.randn(shape, dtype=dtype, device=device)
    return x, w, dy


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def _gpu_marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_gpu_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(backend, device, shape):
    x, w, dy = _inputs(shape, torch.float32, device)
    y, dx, dw = _run(lambda a, b: rms_norm(a, b, 1e-6, backend=backend), x, w, dy)
    y_ref, dx_ref, dw_ref = _run(lambda a, b: rms_norm_reference(a.double(), b.double(), 1e-6), x, w, dy.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    # dw sums over every row: its error grows with the row count.
    torch.testing.assert_close(dw.double(), dw_ref.double(), rtol=1e-5, atol=1e-5 * x.numel() / x.shape[-1])


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_gpu_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 513)])
def test_low_precision_error_within_2x_torch(backend, device, dtype, shape):
    x, w, dy = _inputs(shape, dtype, device)
    ours = _run(lambda a, b: rms_norm(a, b, 1e-6, backend=backend), x, w, dy)
    ref32 = _run(lambda a, b: rms_norm_reference(a.float(), b.float(), 1e-6), x, w, dy.float())
    lowp = _run(lambda a, b: rms_norm_reference(a, b, 1e-6, upcast=False), x, w, dy)
    for name, o, r, t in zip(("y", "dx", "dw"), ours, ref32, lowp):
        assert o.dtype == dtype
        assert_lowp_rule(o, t, r, name)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_gradcheck_float64(backend):
    if backend not in compiled_backends("cpu"):
        pytest.fail(f"backend {backend} unavailable on the CPU test machine")
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5, backend=backend), (x, w))


def test_closed_form_backward_matches_autograd():
    x, w, dy = _inputs((4, 9, 33), torch.float64, "cpu")
    _, dx, dw = _run(lambda a, b: rms_norm_reference(a, b, 1e-6), x, w, dy)
    dx2, dw2 = rms_norm_backward_reference(dy, x, w, 1e-6)
    assert_close(dx2, dx)
    assert_close(dw2, dw)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_opcheck(backend):
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.rms_norm.default, (x, w, 1e-6, backend))
    dy = torch.randn(4, 24)
    torch.library.opcheck(torch.ops.fastllm.rms_norm_backward.default, (dy, x.detach(), w.detach(), 1e-6, backend))


def test_opcheck_native_kernels():
    x, w, dy = torch.randn(6, 40), torch.randn(40), torch.randn(6, 40)
    torch.library.opcheck(torch.ops.fastllm.rms_norm_fwd.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.fastllm.rms_norm_bwd.default, (dy, x, w, 1e-6))


def test_torch_compile_fullgraph_traces_module():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), RMSNorm(32, backend="native"), torch.nn.Linear(32, 4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16)
    y = compiled(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(y, model(x))
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_env_variable_forces_backend(backend_env):
    x, w = torch.randn(3, 8), torch.randn(8)
    backend_env("bogus")
    with pytest.raises(ValueError, match="FASTLLM_BACKEND"):
        rms_norm(x, w)
    backend_env("reference")
    assert fastllm.ops.choose("rms_norm", x.device, native_op="rms_norm_fwd") == "reference"
    backend_env(None)
    assert fastllm.ops.choose("rms_norm", x.device, native_op="rms_norm_fwd") == "native"


def test_poisoned_outputs_are_fully_written():
    # conftest sets FASTLLM_POISON=1: a NaN here means the kernel skipped an element.
    for backend in compiled_backends("cpu"):
        x = torch.randn(7, 300)
        assert torch.isfinite(rms_norm(x, torch.ones(300), backend=backend)).all(), backend


def test_extension_is_built():
    # The test command builds the extension: a silent fallback would hide the C++ path.
    assert fastllm.extension_available(), fastllm._extension.load_error()


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_bad_input_errors_name_the_argument(backend):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight: expected shape \[16\]"):
        rms_norm(x, torch.ones(15), backend=backend)
    with pytest.raises(TypeError, match="x: expected dtype"):
        rms_norm(x.to(torch.int32), torch.ones(16), backend=backend)
    with pytest.raises(ValueError, match="eps: expected a positive value"):
        rms_norm(x, torch.ones(16), eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="backend: expected one of"):
        rms_norm(x, torch.ones(16), backend="cuda")


def test_cpp_checks_name_the_argument():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"weight: expected shape \[16\]"):
        torch.ops.fastllm.rms_norm_fwd(x, torch.ones(15), 1e-6)
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        torch.ops.fastllm.rms_norm_fwd(torch.randn(16, 4).t(), torch.ones(16), 1e-6)
    with pytest.raises(RuntimeError, match="x: expected dtype in"):
        torch.ops.fastllm.rms_norm_fwd(x.to(torch.int64), torch.ones(16), 1e-6)


def test_non_contiguous_input_through_public_api():
    x = torch.randn(16, 24).t()  # (24, 16), non-contiguous
    w = torch.randn(16)
    for backend in compiled_backends("cpu"):
        assert_close(rms_norm(x, w, backend=backend), rms_norm_reference(x, w))


def test_module_defaults():
    m = RMSNorm(10)
    assert m.weight.shape == (10,) and torch.equal(m.weight, torch.ones(10))
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)
