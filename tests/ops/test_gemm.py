"""The CPU tile kernel's matrix product (`torch.ops.fastllm.mm_f32_out_`, csrc/cpu/gemm.cpp:
the chunked logits-free ops' products, and through tile_mm.h the LoRA base products) against
a float64 product: row blocks, K slices and column remainders, a transposed a or b, accumulation,
layouts the kernel does not take (they go to ATen), argument errors."""

from __future__ import annotations

import pytest
import torch

import fastllm

pytestmark = [pytest.mark.skipif(not fastllm.extension_available(), reason="needs the compiled extension"),
              pytest.mark.usefixtures("cpu_products")]  # every test on the tile kernel and on BLAS

# (M, K, N): one row, 6-row blocks and remainders, K over the 256-slice, N over a 64-column
# panel with whole-vector, 8-lane (45, 1000) and scalar remainders, rows split into parts for the threads (97) or
# for L2 (1001: three parts, the last shorter), panel groups with a shorter last group (1050
# columns: 17 panels in groups of 4), the head's shapes; for the AVX2 strips: one 16-column
# strip (a LoRA factor: the rows split for the threads instead), K in uneven 320-slices (700:
# three of 234), columns over the 1024-column chunk with a 2-column strip left (2050)
SHAPES = [(1, 1, 1), (5, 3, 17), (48, 256, 64), (97, 300, 131), (200, 513, 45), (256, 576, 1000),
          (1001, 300, 1050), (300, 700, 16), (7, 641, 2050)]


def _check(c, a, b, c0=None):
    exact = a.double() @ b.double() + (0 if c0 is None else c0.double())
    scale = a.double().abs() @ b.double().abs() + (0 if c0 is None else c0.double().abs())
    bound = 4 * max(a.shape[1], 1) ** 0.5 * 2.0 ** -24 * scale + 1e-30
    assert ((c.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_float64_product(M, K, N, a_transposed, b_transposed, accumulate):
    """b_transposed: a weight (N, K) passed as its .t() view, transposed by the kernel's packing."""
    a = torch.randn(K, M).t() if a_transposed else torch.randn(M, K)
    b = torch.randn(N, K).t() if b_transposed else torch.randn(K, N)
    c0 = torch.randn(M, N)
    c = c0.clone()
    torch.ops.fastllm.mm_f32_out_(c, a, b, accumulate)
    _check(c, a, b, c0 if accumulate else None)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_the_other_rows(threads):
    """On the tile kernel a row's sum is the same bits in a product of 1, 97 or 1001 rows, on one
    thread or two (the split-invariance of the RL losses rests on it); BLAS promises nothing."""
    if torch.ops.fastllm.cpu_products() != "tile":
        pytest.skip("row invariance is the tile kernel's property")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, w = torch.randn(1001, 700), torch.randn(300, 700)
        rows = {}
        for m in (1, 97, 1001):
            c = torch.empty(m, 300)
            torch.ops.fastllm.mm_f32_out_(c, a[:m], w.t(), False)
            rows[m] = c
        assert torch.equal(rows[1], rows[1001][:1]) and torch.equal(rows[97], rows[1001][:97])
    finally:
        torch.set_num_threads(previous)


def test_into_a_row_slice_of_a_larger_matrix():
    out = torch.full((300, 40), 7.0)
    a, b = torch.randn(100, 64), torch.randn(64, 40)
    torch.ops.fastllm.mm_f32_out_(out[100:200], a, b, False)
    _check(out[100:200], a, b)
    assert (out[:100] == 7).all() and (out[200:] == 7).all()


def test_other_layouts_go_to_aten():
    a = torch.randn(70, 90)[:, ::2]  # neither stride 1
    b = torch.randn(45, 160)[:, ::2]  # neither stride 1
    c = torch.empty(70, 80)
    torch.ops.fastllm.mm_f32_out_(c, a, b, False)
    _check(c, a, b)


def test_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="b: expected 4 rows"):
        torch.ops.fastllm.mm_f32_out_(torch.empty(3, 5), torch.randn(3, 4), torch.randn(5, 5), False)
    with pytest.raises(RuntimeError, match="c: expected shape"):
        torch.ops.fastllm.mm_f32_out_(torch.empty(3, 6), torch.randn(3, 4), torch.randn(4, 5), False)
    with pytest.raises(RuntimeError, match="a"):
        torch.ops.fastllm.mm_f32_out_(torch.empty(3, 5), torch.randn(3, 4).double(), torch.randn(4, 5), False)


def test_large_outputs_come_back_from_the_pool_and_profiles_count_them():
    """An op's freed output of >= 1 MiB serves the next output of that size (no fresh pages);
    memory profiles (bench/harness.py's peak) still count it as allocated while it lives."""
    from bench.harness import peak_memory_mb

    g, u = torch.randn(512, 1024), torch.randn(512, 1024)  # 2 MiB outputs
    first = torch.ops.fastllm.swiglu_fwd(g, u)
    assert not first.untyped_storage().resizable()  # the pool's block, not the allocator's
    ptr = first.data_ptr()
    del first
    again = torch.ops.fastllm.swiglu_fwd(g, u)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, torch.nn.functional.silu(g) * u)
    del again
    assert peak_memory_mb(lambda: torch.ops.fastllm.swiglu_fwd(g, u), torch.device("cpu")) >= 2.0


def test_pool_off_by_environment():
    import os
    import subprocess
    import sys

    code = ("import torch, fastllm; g = torch.randn(512, 1024); b = torch.ops.fastllm.swiglu_fwd(g, g); "
            "assert b.untyped_storage().resizable(), 'a pooled block with the pool off'; "
            "torch.testing.assert_close(b, torch.nn.functional.silu(g) * g); print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FASTLLM_CPU_POOL_MB": "0", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_pooled_empty_serves_a_python_scratch_block_from_the_pool():
    block = torch.ops.fastllm.pooled_empty([256, 1024], torch.float64)  # 2 MiB of float64
    assert block.shape == (256, 1024) and block.dtype == torch.float64 and block.is_contiguous()
    assert block.device.type == "cpu" and not block.untyped_storage().resizable()
    ptr = block.data_ptr()
    del block
    assert torch.ops.fastllm.pooled_empty([1024, 256], torch.float64).data_ptr() == ptr  # same bytes, same block
    small = torch.ops.fastllm.pooled_empty([3, 5], torch.float64)  # under 1 MiB: the allocator's
    assert small.shape == (3, 5) and small.untyped_storage().resizable()
    with pytest.raises(RuntimeError, match="size: expected sizes >= 0"):
        torch.ops.fastllm.pooled_empty([4, -1], torch.float64)


def test_new_output_on_the_cpu_comes_from_the_pool(monkeypatch):
    from fastllm.ops._backend import new_output

    out = new_output((512, 1024), dtype=torch.float32, device=torch.device("cpu"))
    assert out.shape == (512, 1024) and not out.untyped_storage().resizable()
    assert new_output(7, dtype=torch.float32, device="cpu").shape == (7,)
    monkeypatch.setenv("FASTLLM_POISON", "1")
    assert new_output((512, 1024), dtype=torch.float32, device=torch.device("cpu")).isnan().all()


def test_the_logits_free_loss_takes_its_logits_block_from_the_pool(monkeypatch):
    """The chunked loss's (chunk, V) logits block, made on every call, is a pooled block: the next
    training step finds it mapped (a fresh 201 MB block was 49k page faults a SmolLM2 LoRA step)."""
    from fastllm.ops import linear_cross_entropy

    blocks = []
    real = torch.ops.fastllm.pooled_empty

    def spy(size, dtype):
        out = real(size, dtype)
        # the (chunk, V) logits block; grad_hidden and the loss rows also come from the pool
        if len(size) == 2 and size[1] == 2000:
            blocks.append(out.data_ptr())
        return out

    monkeypatch.setattr(torch.ops.fastllm, "pooled_empty", spy)
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(2000, 64, requires_grad=True)
    y = torch.randint(0, 2000, (300,))
    for _ in range(2):
        loss = linear_cross_entropy(h, w, y)
        loss.backward()
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.t(), y))
    assert len(blocks) == 2 and blocks[0] == blocks[1], blocks  # the second call reused the first's block
