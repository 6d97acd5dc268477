"""Shared test settings: the one tolerance table, backend/device parametrisation, and the
`gpu` marker's skip.

Rules (docs/ARCHITECTURE.md, "Tests"): float32/float64 compare tightly against the
reference; bfloat16/float16 follow FlashAttention's rule - the kernel's max error against
a float32 reference may be at most ERR_RATIO x the error of the same PyTorch computation
run in the low precision (plus a floor for values that round exactly).
"""

from __future__ import annotations

import contextlib
import os

# Set before fastllm/triton are imported: run Triton kernels on the CPU, and poison
# every new kernel output with NaN so unwritten elements fail the comparisons.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLLM_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastllm  # noqa: E402,F401

# dtype -> (rtol, atol) for direct comparisons against the reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Low-precision rule: max|ours - ref32| <= ERR_RATIO * max|torch_lowp - ref32| + ERR_FLOOR.
ERR_RATIO = 2.0
ERR_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not CUDA:  # the marker, not a path containing "gpu"
            item.add_marker(skip_gpu)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """Compare with the table's tolerance for `dtype` (default: actual's dtype)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float() if actual.dtype != torch.float64 else actual,
                               expected.to(actual.float().dtype if actual.dtype != torch.float64 else torch.float64),
                               rtol=rtol, atol=atol, msg=msg or None)


def assert_lowp_rule(ours: torch.Tensor, torch_lowp: torch.Tensor, ref32: torch.Tensor, name: str = "output"):
    """FlashAttention's rule for bf16/fp16: our error is at most ERR_RATIO x PyTorch's own."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err = (ours.double() - ref32.double()).abs().max().item()
    torch_err = (torch_lowp.double() - ref32.double()).abs().max().item()
    bound = ERR_RATIO * torch_err + ERR_FLOOR[ours.dtype]
    assert ours_err <= bound, f"{name}: max error {ours_err:.3g} > {ERR_RATIO} x torch's {torch_err:.3g} + floor"


def compiled_backends(device: str) -> list[str]:
    """Every backend usable on `device` here: reference always; native when fastllm._C has
    the kernel; triton on CUDA or under TRITON_INTERPRET=1."""
    from fastllm.ops import _backend

    out = ["reference"]
    if fastllm.extension_available():
        out.append("native")
    if _backend.triton_error() is None and (device == "cuda" or _backend.triton_interpreting()):
        out.append("triton")
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    from fastllm.ops import _backend

    _backend.clear_cache()  # a test that changed FASTLLM_BACKEND leaves no stale choice behind


@pytest.fixture
def backend_env(monkeypatch):
    """set(value): set FASTLLM_BACKEND (None: unset) and forget the cached backend choices."""
    from fastllm.ops import _backend

    def set_env(value):
        if value is None:
            monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
        else:
            monkeypatch.setenv("FASTLLM_BACKEND", value)
        _backend.clear_cache()

    return set_env


def _cpu_products_choices() -> list[str]:
    if not fastllm.extension_available() or not hasattr(torch.ops.fastllm, "cpu_products"):
        return ["default"]
    return ["tile", "blas"] if torch.ops.fastllm.cpu_isa() != "none" else ["blas"]


@pytest.fixture(params=_cpu_products_choices())
def cpu_products(request):
    """Runs the test once per engine of the CPU ops' large float32 products ("tile": fastllm's
    tile kernel, "blas": torch's BLAS; `torch.ops.fastllm.set_cpu_products`), whichever this
    CPU picks by default, and restores the default afterwards."""
    if request.param == "default":
        yield request.param
        return
    torch.ops.fastllm.set_cpu_products(request.param)
    try:
        yield request.param
    finally:
        torch.ops.fastllm.set_cpu_products("default")


@contextlib.contextmanager
def row_invariant_products():
    """Runs the CPU ops' large products on the tile kernel where this CPU has it: its rounding of
    a row does not depend on how many rows the product has, while MKL's does (its blocking
    follows the shape), so a micro-batch or rank split would move the last bits and, over a few
    optimizer steps, ~1e-5 of a loss. The split-invariance tests compare to 1e-5, a bound on our
    aggregation, not on BLAS's rounding. Also sets FASTLLM_CPU_PRODUCTS for the worker processes
    such a test starts."""
    if _cpu_products_choices() != ["tile", "blas"]:
        yield
        return
    previous = os.environ.get("FASTLLM_CPU_PRODUCTS")
    os.environ["FASTLLM_CPU_PRODUCTS"] = "tile"
    torch.ops.fastllm.set_cpu_products("tile")
    try:
        yield
    finally:
        torch.ops.fastllm.set_cpu_products("default")
        if previous is None:
            os.environ.pop("FASTLLM_CPU_PRODUCTS", None)
        else:
            os.environ["FASTLLM_CPU_PRODUCTS"] = previous
