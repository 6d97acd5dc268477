"""A short demo: run each fused op on every backend available here, check it against the
reference and time it, and print the side-by-side table."""

from __future__ import annotations

import statistics
import time

import torch

import fastllm
from fastllm.ops import _backend, rms_norm, rms_norm_reference


def _available_backends(device: torch.device) -> list[str]:
    out = []
    for backend in _backend.BACKENDS:
        try:
            _backend.choose("rms_norm", device, backend, native_op="rms_norm_fwd")
        except RuntimeError:
            continue
        if backend == "triton" and device.type == "cpu":
            continue  # the CPU interpreter is for tests, far too slow to time
        out.append(backend)
    return out


def _median_ms(fn, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(rows: int = 2048, hidden: int = 2048, device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ext = "loaded" if fastllm.extension_available() else "NOT loaded"
    print(f"fastllm {fastllm.__version__}: compiled extension {ext}, device {device}, torch {torch.__version__}")
    x = torch.randn(rows, hidden, device=device, requires_grad=True)
    w = torch.randn(hidden, device=device, requires_grad=True)
    dy = torch.randn(rows, hidden, device=device)
    y_ref = rms_norm_reference(x.double(), w.double())
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy.double())
    rows_out = []
    print(f"\nRMSNorm forward+backward, {rows} x {hidden} float32")
    print(f"{'backend':<10} {'max |y err|':>12} {'max |dx err|':>13} {'max |dw err|':>13} {'median ms':>10}")
    for backend in _available_backends(device):
        def step(backend=backend):
            y = rms_norm(x, w, backend=backend)
            return y, *torch.autograd.grad(y, (x, w), dy)

        y, gx, gw = step()
        errs = [(a.double() - b).abs().max().item() for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref))]
        ms = _median_ms(step)
        rows_out.append({"backend": backend, "y_err": errs[0], "dx_err": errs[1], "dw_err": errs[2], "ms": ms})
        print(f"{backend:<10} {errs[0]:>12.2e} {errs[1]:>13.2e} {errs[2]:>13.2e} {ms:>10.2f}")
    return rows_out
