"""The small-rows linear (a decode step's projections and LM head): the native CPU kernel
against a float64 reference at odd shapes, strides and thread counts; the wrapper's choice
between the kernel and F.linear; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.ops import SMALL_LINEAR_MAX_ROWS, linear, small_linear, small_linear_reference

pytestmark = pytest.mark.skipif(not fastllm.extension_available(), reason="needs the compiled extension")

ROWS = [1, 2, 3, 4, 5, 7, 8, 10, 12, 16, 17, 63, 64]  # every count of passes per weight tile, and tails
# (N, K): below one vector, a K tail after whole vectors, N not a multiple of the tile, SmolLM2's; K in
# slices (x of 8 or 16 rows by 1536 features: too large for L1)
SHAPES = [(1, 1), (5, 3), (17, 33), (4, 16), (37, 1000), (130, 576), (40, 1536)]


def op(x, w, b=None):
    return torch.ops.fastllm.small_linear_fwd(x, w, b, [])[0]


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """|y - exact| within 4 sqrt(K) float32 roundings of sum_k |x_k w_k| per element (a wrong or
    missed product is off by about one |x_k w_k|, far outside it)."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    bound = 4 * max(x.shape[-1], 1) ** 0.5 * 2.0 ** -24 * scale + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_against_float64(rows, n, k, with_bias, cpu_products):
    """On both products engines: one row goes to BLAS where the engine is BLAS."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    check(op(x, w, b), x, w, b)


@pytest.mark.parametrize("rows", [1, 6])
def test_strided_rows(rows, cpu_products):
    """x and W with row strides larger than K (views into wider tensors)."""
    x_big, w_big = torch.randn(rows, 80), torch.randn(21, 70)
    x, w = x_big[:, 3:53], w_big[:, 10:60]
    assert not w.is_contiguous()
    check(op(x, w), x, w, None)


def test_threads_give_identical_results():
    """Threads split the output columns, and a thread that is done takes over columns another has
    not started (balanced_for): each element is summed the same way on any count, whichever
    thread runs it. Many calls on 2-4 threads, so that threads finish apart and take from each
    other, each equal to the one-thread result: a column run twice is harmless, one skipped or
    run from the wrong rows is not."""
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(9, 576, generator=g), torch.randn(3072 + 13, 576, generator=g), torch.randn(3072 + 13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, w, b)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for _ in range(40):
                assert torch.equal(op(x, w, b), one)
    finally:
        torch.set_num_threads(before)
    check(one, x, w, b)


def test_empty_shapes():
    assert op(torch.randn(0, 5), torch.randn(3, 5)).shape == (0, 3)
    assert op(torch.randn(2, 5), torch.randn(0, 5)).shape == (2, 0)
    b = torch.randn(3)
    assert torch.equal(op(torch.randn(2, 0), torch.randn(3, 0), b), b.expand(2, 3))
    assert torch.equal(op(torch.randn(2, 0), torch.randn(3, 0)), torch.zeros(2, 3))


def test_wrapper_uses_the_kernel_where_it_applies():
    x, w, b = torch.randn(2, 1, 40), torch.randn(24, 40), torch.randn(24)
    with torch.no_grad():
        y = small_linear(x, w, b)
    assert y.shape == (2, 1, 24)
    assert torch.equal(y, op(x.reshape(2, 40), w, b).view(2, 1, 24))  # the kernel's own bits
    check(y.reshape(2, 24), x.reshape(2, 40), w, b)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_split_outputs(rows, cpu_products):
    """Column blocks written as separate contiguous outputs equal the one output's columns
    (blocks that start inside a 4-row tile, an empty block, one-column blocks)."""
    x, w, b = torch.randn(rows, 50), torch.randn(23, 50), torch.randn(23)
    sizes = [9, 3, 0, 1, 10]
    parts = torch.ops.fastllm.small_linear_fwd(x, w, b, sizes)
    assert [tuple(t.shape) for t in parts] == [(rows, n) for n in sizes]
    assert all(t.is_contiguous() for t in parts)
    assert torch.equal(torch.cat(parts, 1), op(x, w, b))
    with torch.no_grad():
        wrapped = small_linear(x[:, None], w, b, split=sizes)  # (rows, 1, n) parts, as a decode step has
    assert [tuple(t.shape) for t in wrapped] == [(rows, 1, n) for n in sizes]
    assert torch.equal(torch.cat(wrapped, -1)[:, 0], op(x, w, b))
    fallback = small_linear(x, w, b, split=sizes, backend="reference")
    assert torch.equal(torch.cat(fallback, -1), F.linear(x, w, b))


def test_wrapper_falls_back_to_linear():
    """Where the small-rows kernel does not apply, fastllm.ops.linear: the tile kernel, or F.linear."""
    w = torch.randn(24, 40, requires_grad=True)
    x = torch.randn(3, 40)
    y = small_linear(x, w)  # a gradient is needed: fastllm.ops.linear (the kernel has no backward)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(24, 40))
    big = torch.randn(SMALL_LINEAR_MAX_ROWS + 1, 40)
    with torch.no_grad():
        # too many rows (a prefill): the tile kernel's linear, bit for bit
        assert torch.equal(small_linear(big, w), linear(big, w))
        # with a split: each part the tile kernel's product of its weight rows, contiguous
        parts = small_linear(big, w, split=[10, 0, 14])
        assert [tuple(t.shape) for t in parts] == [(SMALL_LINEAR_MAX_ROWS + 1, n) for n in (10, 0, 14)]
        assert all(t.is_contiguous() for t in parts)
        assert torch.equal(parts[0], linear(big, w[:10])) and torch.equal(parts[2], linear(big, w[10:]))
        check(torch.cat(parts, -1), big, w.detach(), None)
        b = torch.randn(24)
        parts = small_linear(big, w, b, split=[10, 14])
        assert torch.equal(parts[1], linear(big, w[10:], b[10:]))
        # the reference backend: views of one F.linear
        parts = small_linear(big, w, split=[10, 14], backend="reference")
        assert torch.equal(torch.cat(parts, -1), F.linear(big, w))
        check(small_linear(big, w), big, w.detach(), None)
        assert torch.equal(small_linear(big, w, backend="reference"), F.linear(big, w))
        assert torch.equal(small_linear(x.double(), w.double()), F.linear(x.double(), w.double()))  # not float32
        assert torch.equal(small_linear(x, w, backend="reference"), small_linear_reference(x, w))


def test_reference_backend_from_the_environment(backend_env):
    backend_env("reference")
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    with torch.no_grad():
        assert torch.equal(small_linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("call,match", [
    (lambda: op(torch.randn(2, 5), torch.randn(3, 6)), "weight: expected 5 columns"),
    (lambda: op(torch.randn(2, 5).double(), torch.randn(3, 5)), "x: expected dtype"),
    (lambda: op(torch.randn(2, 5), torch.randn(3, 5).half()), "weight: expected dtype"),
    (lambda: op(torch.randn(2, 5), torch.randn(3, 5), torch.randn(4)), "bias: expected 3 values"),
    (lambda: op(torch.randn(2, 5, 1), torch.randn(3, 5)), "x: expected 2-D"),
    (lambda: op(torch.randn(5, 2).T, torch.randn(3, 5)), "x: expected unit stride"),
    (lambda: torch.ops.fastllm.small_linear_fwd(torch.randn(2, 5), torch.randn(3, 5), None, [1, 1]),
     "split: expected widths summing to 3"),
])
def test_argument_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
