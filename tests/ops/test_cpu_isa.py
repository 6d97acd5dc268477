"""The CPU kernels' narrower vector bodies, run on this CPU by capping the ISA the extension
dispatches to (FASTLLM_CPU_ISA, read once at load time: so in a fresh process): the AVX2+FMA
bodies and the portable/BLAS fallbacks of small_linear, decode attention and the tile kernel
(attention, LoRA base products) go through the same reference comparisons as the default (widest) bodies do in the rest
of tests/ops. The default run covers the widest body this CPU has."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastllm

pytestmark = pytest.mark.skipif(not fastllm.extension_available(), reason="needs the compiled extension")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the comparisons that reach the dispatched bodies (float32 attention and LoRA base products: the
# tile kernel)
SELECTION = [
    "tests/ops/test_small_linear.py",
    "tests/ops/test_lora_linear.py::test_float32_matches_reference",
    "tests/ops/test_gemm.py",
    "tests/ops/test_decode_attention.py::test_matches_reference",
    "tests/ops/test_attention.py::test_float32_matches_float64_reference",
    "tests/ops/test_attention.py::test_float32_long_sequences",
    "tests/ops/test_attention.py::test_varlen_matches_per_sequence_reference",
    "tests/ops/test_attention.py::test_cpu_backward_plans_match_reference",
]


def _run(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("FASTLLM_CPU_ISA", None)
    if isa is not None:
        env["FASTLLM_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _isa(isa: str | None) -> str:
    out = _run("import fastllm, torch; print(torch.ops.fastllm.cpu_isa())", isa)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_cap_lowers_and_never_raises_the_isa():
    order = ["none", "avx2", "avx512"]
    best = torch.ops.fastllm.cpu_isa() if "FASTLLM_CPU_ISA" not in os.environ else _isa(None)
    assert best in order
    for cap in order:
        assert _isa(cap) == order[min(order.index(cap), order.index(best))]


def test_unknown_cap_is_reported_and_ignored():
    out = _run("import fastllm, torch; print(torch.ops.fastllm.cpu_isa())", "sse9")
    assert out.returncode == 0, out.stderr
    assert "FASTLLM_CPU_ISA=sse9 ignored" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == _isa(None)


@pytest.mark.parametrize("isa", ["avx2", "none"])
def test_narrower_bodies_match_the_references(isa):
    if _isa(isa) != isa:
        pytest.skip(f"this CPU has no {isa} body")  # only when the CPU lacks AVX2: there is nothing narrower to run
    if _isa(None) == isa:
        pytest.skip(f"{isa} is this CPU's widest body: the rest of tests/ops runs it already")
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', "
            + ", ".join(repr(s) for s in SELECTION) + "]))")
    out = _run(code, isa)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def _products(env_value: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("FASTLLM_CPU_PRODUCTS", None)
    if env_value is not None:
        env["FASTLLM_CPU_PRODUCTS"] = env_value
    return subprocess.run([sys.executable, "-c", "import fastllm, torch; print(torch.ops.fastllm.cpu_products())"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _intel() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU vendor from")


def test_products_engine_default_follows_the_cpu_and_its_blas():
    """The tile kernel where the ISA runs it, except on an Intel CPU with MKL (BLAS)."""
    out = _products(None)
    assert out.returncode == 0, out.stderr
    isa = torch.ops.fastllm.cpu_isa()
    blas = (torch.backends.mkl.is_available() and _intel()) or isa == "none"
    assert out.stdout.strip().splitlines()[-1] == ("blas" if blas else "tile")


def test_small_linear_gives_one_row_to_blas_only_on_intel_with_the_blas_engine(cpu_products):
    """small_linear_fwd hands one row (never more) to BLAS where the products engine is BLAS on an
    Intel CPU, and then its result is BLAS's own product, bit for bit."""
    ops = torch.ops.fastllm
    on_blas = ops.cpu_products() == "blas" and _intel()
    assert ops.small_linear_on_blas(1) == on_blas
    assert not any(ops.small_linear_on_blas(rows) for rows in (0, 2, 4, 16, 64))
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 333, generator=g), torch.randn(71, 333, generator=g)
    if on_blas:
        assert torch.equal(ops.small_linear_fwd(x, w, None, [])[0], torch.mm(x, w.t()))


@pytest.mark.parametrize("name", ["tile", "blas"])
def test_products_engine_env_override(name):
    out = _products(name)
    assert out.returncode == 0, out.stderr
    expected = "blas" if name == "tile" and torch.ops.fastllm.cpu_isa() == "none" else name
    assert out.stdout.strip().splitlines()[-1] == expected


def test_products_engine_bad_env_value_is_named_and_ignored():
    out, default = _products("fast"), _products(None)
    assert out.returncode == 0, out.stderr
    assert "FASTLLM_CPU_PRODUCTS=fast ignored" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == default.stdout.strip().splitlines()[-1]


def test_set_products_engine_round_trip_and_errors():
    default = torch.ops.fastllm.cpu_products()
    try:
        torch.ops.fastllm.set_cpu_products("blas")
        assert torch.ops.fastllm.cpu_products() == "blas"
        if torch.ops.fastllm.cpu_isa() != "none":
            torch.ops.fastllm.set_cpu_products("tile")
            assert torch.ops.fastllm.cpu_products() == "tile"
        with pytest.raises(RuntimeError, match="name: expected 'tile', 'blas' or 'default', got 'gpu'"):
            torch.ops.fastllm.set_cpu_products("gpu")
    finally:
        torch.ops.fastllm.set_cpu_products("default")
    assert torch.ops.fastllm.cpu_products() == default
