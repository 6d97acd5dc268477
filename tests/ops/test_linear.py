"""fastllm.ops.linear (F.linear's contract; the models' plain projections): the registered op
`fastllm::linear` against a float64 F.linear, output and every gradient (x, weight, bias), odd
shapes and leading dims, non-contiguous x, partial gradients; the fallbacks (other dtypes, the
reference backend); opcheck and a torch.compile trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.ops import linear

pytestmark = pytest.mark.skipif(not fastllm.extension_available(), reason="needs the compiled extension")

# (leading shape, in, out): rows around 6-row blocks and a two-part split,
# K over the 256-slice, out with vector and scalar remainders
SHAPES = [((1,), 1, 1), ((3, 5), 7, 9), ((65,), 40, 70), ((2, 97), 300, 131), ((4, 64), 576, 192)]


def _bound(exact, scale, K):
    return 4 * max(K, 1) ** 0.5 * 2.0 ** -24 * scale + 1e-30


def _check(got, x, w, b, dy=None):
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= _bound(exact, scale, x.shape[-1])).all()


@pytest.mark.parametrize("shape,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_with_every_gradient(shape, K, N, bias, cpu_products):
    x = torch.randn(*shape, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True) if bias else None
    y = linear(x, w, b)
    _check(y.detach(), x.detach(), w.detach(), None if b is None else b.detach())
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    xd, wd, dyd = x.detach().double(), w.detach().double(), dy.double()
    rows = xd.reshape(-1, K)
    dyr = dyd.reshape(-1, N)
    expected = [dyd @ wd, dyr.t() @ rows] + ([dyr.sum(0)] if bias else [])
    scales = [dyd.abs() @ wd.abs(), dyr.abs().t() @ rows.abs()] + ([dyr.abs().sum(0)] if bias else [])
    depths = [N, rows.shape[0], rows.shape[0]]
    for name, g, e, s, k in zip(("dx", "dw", "db"), grads, expected, scales, depths):
        assert g.shape == e.shape, name
        assert ((g.double() - e).abs() <= _bound(e, s, k)).all(), name


def test_non_contiguous_input_and_partial_gradients():
    x = torch.randn(40, 90)[:, ::2]  # (40, 45), stride 2
    w = torch.randn(30, 45, requires_grad=True)
    y = linear(x, w)
    _check(y.detach(), x, w.detach(), None)
    (dw,) = torch.autograd.grad(y.sum(), [w])  # x needs no gradient: only dW is formed
    torch.testing.assert_close(dw, torch.ones(40, 30).t() @ x, rtol=1e-5, atol=1e-4)


def test_routes():
    w = torch.randn(16, 8)
    big = torch.randn(200, 8, dtype=torch.float64)
    assert torch.equal(linear(big, w.double()), F.linear(big, w.double()))  # float64: F.linear itself
    x = torch.randn(100, 8)
    assert torch.equal(linear(x, w, backend="reference"), F.linear(x, w))


def test_opcheck_and_compile():
    x = torch.randn(70, 12, requires_grad=True)
    w = torch.randn(9, 12, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.linear, (x, w, b))
    compiled = torch.compile(lambda x, w, b: linear(x, w, b), fullgraph=True, backend="eager")  # traces F.linear
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
