"""Fused LoRA linear: every backend against the reference, the output and the gradients of
x, A and B (with and without bias and dropout); no gradient for the frozen weight."""

from __future__ import annotations

import pytest
import torch

from fastllm.ops import lora_linear, lora_linear_backward_reference, lora_linear_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule, compiled_backends

BACKEND_DEVICE = [(b, d) for d in DEVICES for b in compiled_backends(d)]
# (leading shape of x, in, out, r): rows and features that are not multiples of any block.
# ((2, 100), 300, 131): the CPU tile kernel's row blocks, K slices and column remainders.
# r = 72: above the 64 ranks the CPU merge kernel takes (BLAS merges it). r = 16, 32, 64: the
# CPU backward's fused rank-r pass (8 rows at a time, then one by one; 32 and 16 features of x at
# a time, then one by one).
SHAPES = [((5,), 8, 16, 1), ((2, 7), 37, 45, 5), ((3, 11), 80, 33, 16), ((65,), 40, 70, 24),
          ((2, 100), 300, 131, 8), ((4,), 20, 12, 72), ((2, 13), 50, 21, 32), ((9,), 24, 10, 64)]


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


def _inputs(lead, in_f, out_f, r, dtype, device, bias=True, dropout_p=0.0):
    x = torch.randn(*lead, in_f, dtype=dtype, device=device)
    w = torch.randn(out_f, in_f, dtype=dtype, device=device) / in_f ** 0.5
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, in_f, dtype=dtype, device=device) / in_f ** 0.5
    bb = torch.randn(out_f, r, dtype=dtype, device=device)  # non-zero, so the branch is tested
    keep = (torch.rand(x.shape, device=device) >= dropout_p) if dropout_p > 0 else None
    dy = torch.randn(*lead, out_f, dtype=dtype, device=device)
    return x, w, b, a, bb, keep, dy


def _run(fn, x, a, bb, dy):
    x, a, bb = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    y = fn(x, a, bb)
    return (y,) + torch.autograd.grad(y, (x, a, bb), dy)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,dropout_p", [(True, 0.0), (False, 0.0), (True, 0.25)])
def test_float32_matches_reference(backend, device, shape, bias, dropout_p, cpu_products):
    x, w, b, a, bb, keep, dy = _inputs(*shape, torch.float32, device, bias, dropout_p)
    s = 0.75
    ours = _run(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, s, keep=keep, dropout_p=dropout_p,
                                               backend=backend), x, a, bb, dy)
    ref = _run(lambda x_, a_, b_: lora_linear_reference(x_.double(), w.double(), None if b is None else b.double(),
                                                        a_.double(), b_.double(), s, keep, dropout_p),
               x, a, bb, dy.double())
    assert ours[0].shape == (*shape[0], shape[2]) and ours[0].dtype == torch.float32
    for name, o, r in zip(("y", "dx", "dA", "dB"), ours, ref, strict=True):
        # dA and dB sum over every row: their error grows with the row count.
        rows = x.numel() // x.shape[-1]
        torch.testing.assert_close(o.double(), r.double(), rtol=1e-5, atol=1e-5 * (rows if name in ("dA", "dB") else 1),
                                   msg=name)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_torch(backend, device, dtype):
    x, w, b, a, bb, keep, dy = _inputs((3, 11), 80, 33, 16, dtype, device, True, 0.1)
    s = 2.0
    ours = _run(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, s, keep=keep, dropout_p=0.1, backend=backend),
                x, a, bb, dy)
    ref32 = _run(lambda x_, a_, b_: lora_linear_reference(x_.float(), w.float(), b.float(), a_.float(), b_.float(),
                                                          s, keep, 0.1), x, a, bb, dy.float())
    lowp = _run(lambda x_, a_, b_: lora_linear_reference(x_, w, b, a_, b_, s, keep, 0.1, upcast=False), x, a, bb, dy)
    for name, o, r, t in zip(("y", "dx", "dA", "dB"), ours, ref32, lowp, strict=True):
        assert o.dtype == dtype, name
        assert_lowp_rule(o, t, r, name)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(backend, dropout_p):
    if backend not in compiled_backends("cpu"):
        pytest.fail(f"backend {backend} unavailable on the CPU test machine")
    x, w, b, a, bb, keep, _ = _inputs((2, 3), 6, 5, 2, torch.float64, "cpu", True, dropout_p)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, 1.5, keep=keep, dropout_p=dropout_p, backend=backend),
        (x, a, bb))


def test_closed_form_backward_matches_autograd():
    x, w, b, a, bb, keep, dy = _inputs((4, 9), 21, 13, 3, torch.float64, "cpu", True, 0.2)
    _, dx, da, db = _run(lambda x_, a_, b_: lora_linear_reference(x_, w, b, a_, b_, 0.5, keep, 0.2), x, a, bb, dy)
    dx2, da2, db2 = lora_linear_backward_reference(dy, x, w, a, bb, 0.5, keep, 0.2)
    for o, r in ((dx2, dx), (da2, da), (db2, db)):
        assert_close(o, r)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_frozen_weight_gets_no_gradient(backend):
    x, w, b, a, bb, _, dy = _inputs((6,), 12, 10, 4, torch.float32, "cpu")
    a.requires_grad_()
    bb.requires_grad_()
    lora_linear(x, w, b, a, bb, 1.0, backend=backend).backward(dy)
    assert w.grad is None and b.grad is None
    assert a.grad is not None and bb.grad is not None
    with pytest.raises(ValueError, match="weight, bias: lora_linear treats the base linear as frozen"):
        lora_linear(x, w.requires_grad_(), b, a, bb, 1.0, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_opcheck(backend):
    x, w, b, a, bb, keep, dy = _inputs((4,), 24, 20, 4, torch.float32, "cpu", True, 0.2)
    a.requires_grad_()
    bb.requires_grad_()
    torch.library.opcheck(torch.ops.fastllm.lora_linear.default, (x, w, b, a, bb, 0.5, keep, 0.2, backend))
    u = (x * keep / 0.8) @ a.detach().t()
    torch.library.opcheck(torch.ops.fastllm.lora_linear_backward.default,
                          (dy, x, w, a.detach(), bb.detach(), u, 0.5, keep, 0.2, backend))


def test_opcheck_native_kernels():
    x, w, b, a, bb, keep, dy = _inputs((6,), 40, 30, 8, torch.float32, "cpu", True, 0.5)
    torch.library.opcheck(torch.ops.fastllm.lora_linear_fwd.default, (x, w, b, a, bb, 2.0, keep, 0.5))
    torch.library.opcheck(torch.ops.fastllm.lora_linear_fwd.default, (x, w, None, a, bb, 2.0, None, 0.0))
    u = x @ a.t()
    torch.library.opcheck(torch.ops.fastllm.lora_linear_bwd.default, (dy, x, w, a, bb, u, 2.0, None, 0.0))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, a, bb, _, dy = _inputs((5,), 16, 12, 4, torch.float32, "cpu")
    a.requires_grad_()
    bb.requires_grad_()
    fn = torch.compile(lambda x_: lora_linear(x_, w, b, a, bb, 0.5, backend="native"), fullgraph=True,
                       backend="aot_eager")
    y = fn(x)
    ga, gb = torch.autograd.grad(y, (a, bb), dy)
    y2 = lora_linear(x, w, b, a, bb, 0.5, backend="native")
    ga2, gb2 = torch.autograd.grad(y2, (a, bb), dy)
    for o, r in ((y, y2), (ga, ga2), (gb, gb2)):
        torch.testing.assert_close(o, r)


def test_poisoned_outputs_are_fully_written():
    for backend in compiled_backends("cpu"):
        x, w, b, a, bb, _, dy = _inputs((33,), 70, 50, 8, torch.float32, "cpu")
        a.requires_grad_()
        y = lora_linear(x.requires_grad_(), w, b, a, bb, 1.0, backend=backend)
        dx, da = torch.autograd.grad(y, (x, a), dy)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(da).all(), backend


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_bad_input_errors_name_the_argument(backend):
    x, w, b, a, bb, _, _ = _inputs((4,), 16, 8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"lora_a: expected shape \(r, 16\)"):
        lora_linear(x, w, b, a[:, :15], bb, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"lora_b: expected shape \[8, 2\]"):
        lora_linear(x, w, b, a, bb[:, :1], 1.0, backend=backend)
    with pytest.raises(TypeError, match="lora_a: expected dtype torch.float32"):
        lora_linear(x, w, b, a.double(), bb, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"dropout_p: expected a value in \[0, 1\)"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=1.0, backend=backend)
    with pytest.raises(ValueError, match="x: expected last dimension 16"):
        lora_linear(x[:, :9], w, b, a, bb, 1.0, backend=backend)


def test_cpp_checks_name_the_argument():
    x, w, b, a, bb, _, _ = _inputs((4,), 16, 8, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"lora_b: expected shape \[8, 2\]"):
        torch.ops.fastllm.lora_linear_fwd(x, w, b, a, bb.t().contiguous(), 1.0, None, 0.0)
    with pytest.raises(RuntimeError, match="keep: expected dtype bool"):
        torch.ops.fastllm.lora_linear_fwd(x, w, b, a, bb, 1.0, torch.ones_like(x), 0.5)


@pytest.mark.parametrize("bias", [True, False])
def test_at_initialisation_the_output_is_the_base_layers_bit_for_bit(bias, cpu_products):
    """B = 0 (a fresh adapter): the native op's y equals fastllm.ops.linear's base output exactly,
    on either engine of the CPU products (the BLAS engine's merged weight W + s B A is W)."""
    from fastllm.ops import linear

    if "native" not in compiled_backends("cpu"):
        pytest.skip("needs the compiled extension")
    x, w = torch.randn(2, 65, 96), torch.randn(160, 96)
    b = torch.randn(160) if bias else None
    a, bb = torch.randn(8, 96), torch.zeros(160, 8)
    y = lora_linear(x, w, b, a, bb, 2.0, backend="native")
    assert torch.equal(y, linear(x, w, b))


# --------------------------------------------------------------------------- groups (q/k/v, gate/up)

# (leading shape of x, in, [(out, r, bias) per projection]): ranks 16 and 32 take the CPU
# backward's fused rank-r pass (the group's dx accumulated by BLAS), 5 and 72 the per-part path;
# a group may mix them and mix biased and unbiased parts.
GROUPS = [((3, 11), 40, [(40, 16, True), (12, 16, True), (12, 16, True)]),
          ((37,), 24, [(50, 32, False), (50, 16, False)]),
          ((2, 9), 30, [(7, 5, True), (31, 72, False), (16, 16, True)]),
          ((5,), 8, [(9, 16, False)])]


def _group_inputs(lead, in_f, parts, dtype, device="cpu"):
    x = torch.randn(*lead, in_f, dtype=dtype, device=device)
    ws = [torch.randn(o, in_f, dtype=dtype, device=device) / in_f ** 0.5 for o, _, _ in parts]
    bs = [torch.randn(o, dtype=dtype, device=device) if bias else None for o, _, bias in parts]
    As = [torch.randn(r, in_f, dtype=dtype, device=device) / in_f ** 0.5 for _, r, _ in parts]
    Bs = [torch.randn(o, r, dtype=dtype, device=device) for o, r, _ in parts]
    scales = [0.5 + i for i in range(len(parts))]
    dys = [torch.randn(*lead, o, dtype=dtype, device=device) for o, _, _ in parts]
    return x, ws, bs, As, Bs, scales, dys


def _run_group(fn, x, As, Bs, dys):
    x = x.detach().clone().requires_grad_()
    As = [a.detach().clone().requires_grad_() for a in As]
    Bs = [b.detach().clone().requires_grad_() for b in Bs]
    ys = fn(x, As, Bs)
    grads = torch.autograd.grad(ys, [x, *As, *Bs], dys)
    return list(ys), grads[0], list(grads[1:1 + len(As)]), list(grads[1 + len(As):])


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_matches_its_parts_reference(backend, group, dtype, cpu_products):
    """lora_linear_group: each output, dx (the sum over the parts) and every part's dA and dB
    against the parts' reference in float64."""
    from fastllm.ops import lora_linear_group

    lead, in_f, parts = group
    x, ws, bs, As, Bs, scales, dys = _group_inputs(lead, in_f, parts, dtype)
    ours = _run_group(lambda x_, a_, b_: lora_linear_group(x_, ws, bs, a_, b_, scales, backend=backend),
                      x, As, Bs, dys)
    ref = _run_group(lambda x_, a_, b_: [lora_linear_reference(x_, w.double(), None if b is None else b.double(),
                                                               a.double(), bb.double(), s)
                                         for w, b, a, bb, s in zip(ws, bs, a_, b_, scales, strict=True)],
                     x.double(), As, Bs, [d.double() for d in dys])
    rows = x.numel() // x.shape[-1]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, o, r in (("y", ours[0], ref[0]), ("dA", ours[2], ref[2]), ("dB", ours[3], ref[3])):
        assert len(o) == len(parts), name
        for i, (oi, ri) in enumerate(zip(o, r, strict=True)):
            assert oi.dtype == dtype and oi.shape == ri.shape, (name, i)
            torch.testing.assert_close(oi.double(), ri.double(), rtol=tol, atol=tol * (1 if name == "y" else rows),
                                       msg=f"{name}[{i}]")
    assert ours[1].dtype == dtype and ours[1].shape == x.shape
    torch.testing.assert_close(ours[1].double(), ref[1].double(), rtol=tol, atol=tol * len(parts), msg="dx")


def test_group_native_takes_one_op_and_gradcheck_float64():
    from fastllm.ops import lora_linear_group

    if "native" not in compiled_backends("cpu"):
        pytest.skip("needs the compiled extension")
    x, ws, bs, As, Bs, scales, _ = _group_inputs((2, 3), 6, [(5, 2, True), (4, 16, False)], torch.float64)
    x = x.requires_grad_()
    As = [a.requires_grad_() for a in As]
    Bs = [b.requires_grad_() for b in Bs]
    assert torch.autograd.gradcheck(
        lambda x_, a0, a1, b0, b1: tuple(lora_linear_group(x_, ws, bs, [a0, a1], [b0, b1], scales, backend="native")),
        (x, *As, *Bs))
    with torch.profiler.profile() as prof:
        lora_linear_group(x, ws, bs, As, Bs, scales, backend="native")
    names = [e.name for e in prof.events()]
    assert "fastllm::lora_linear_group" in names and "fastllm::lora_linear" not in names


def test_group_opcheck_and_compile():
    from fastllm.ops import lora_linear_group

    if "native" not in compiled_backends("cpu"):
        pytest.skip("needs the compiled extension")
    x, ws, bs, As, Bs, scales, dys = _group_inputs((6,), 32, [(32, 16, True), (8, 16, False), (8, 4, True)],
                                                   torch.float32)
    torch.library.opcheck(torch.ops.fastllm.lora_linear_group.default, (x, ws, bs, As, Bs, scales))
    us = [x @ a.t() for a in As]
    torch.library.opcheck(torch.ops.fastllm.lora_linear_group_backward.default, (dys, x, ws, As, Bs, us, scales))
    torch.library.opcheck(torch.ops.fastllm.lora_linear_group_fwd.default, (x, ws, bs, As, Bs, scales))
    torch.library.opcheck(torch.ops.fastllm.lora_linear_group_bwd.default, (dys, x, ws, As, Bs, us, scales))
    torch._dynamo.reset()
    As = [a.requires_grad_() for a in As]
    fn = torch.compile(lambda x_: lora_linear_group(x_, ws, bs, As, Bs, scales, backend="native"), fullgraph=True,
                       backend="aot_eager")
    ys = fn(x)
    ys2 = lora_linear_group(x, ws, bs, As, Bs, scales, backend="native")
    for o, r in zip(torch.autograd.grad(ys, As, dys) + tuple(ys), torch.autograd.grad(ys2, As, dys) + tuple(ys2),
                    strict=True):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_group_bad_input_errors_name_the_argument(backend):
    from fastllm.ops import lora_linear_group

    x, ws, bs, As, Bs, scales, _ = _group_inputs((4,), 16, [(8, 2, True), (6, 2, False)], torch.float32)
    with pytest.raises(ValueError, match="weights, biases, lora_a, lora_b, scales: expected one of each"):
        lora_linear_group(x, ws, bs, As, Bs, scales[:1], backend=backend)
    with pytest.raises(ValueError, match=r"lora_b: expected shape \[6, 2\]"):
        lora_linear_group(x, ws, bs, As, [Bs[0], Bs[1][:, :1]], scales, backend=backend)
    with pytest.raises(ValueError, match="weight, bias: lora_linear treats the base linear as frozen"):
        lora_linear_group(x, [ws[0].requires_grad_(), ws[1]], bs, As, Bs, scales, backend=backend)


def test_group_cpp_checks_name_the_argument():
    if "native" not in compiled_backends("cpu"):
        pytest.skip("needs the compiled extension")
    x, ws, bs, As, Bs, scales, _ = _group_inputs((4,), 16, [(8, 2, True), (6, 2, False)], torch.float32)
    with pytest.raises(RuntimeError, match="lora_a, lora_b, scales: expected one per weight"):
        torch.ops.fastllm.lora_linear_group_fwd(x, ws, bs, As[:1], Bs, scales)
    with pytest.raises(RuntimeError, match="biases: expected one per weight"):
        torch.ops.fastllm.lora_linear_group_fwd(x, ws, bs[:1], As, Bs, scales)
    with pytest.raises(RuntimeError, match="grad_outs, us: expected one per weight"):
        torch.ops.fastllm.lora_linear_group_bwd([x], x, ws, As, Bs, [x @ a.t() for a in As], scales)
