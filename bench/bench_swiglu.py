"""SwiGLU (silu(gate) * up), forward and forward+backward: reference / torch eager /
torch.compile / fastllm.

    python bench/bench_swiglu.py                   # CPU, or the GPU when there is one
    python bench/bench_swiglu.py --rows 4096 --inter 14336 --dtype bfloat16

Bytes moved (memory-bound): forward reads gate and up and writes y (3·R·I elements);
forward+backward adds reading dy, gate, up and writing both gradients (8·R·I in all).
GB/s = bytes / median time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastllm  # noqa: E402
from bench.harness import Case, default_device, run_cases  # noqa: E402
from fastllm.ops import _backend, swiglu, swiglu_reference  # noqa: E402


def swiglu_eager(g, u):
    return F.silu(g) * u


def _inputs(rows, inter, dtype, device, backward):
    g = torch.randn(rows, inter, dtype=dtype, device=device, requires_grad=backward)
    u = torch.randn(rows, inter, dtype=dtype, device=device, requires_grad=backward)
    dy = torch.randn(rows, inter, dtype=dtype, device=device)
    return {"g": g, "u": u, "dy": dy, "backward": backward}


def _step(fn):
    def factory(g, u, dy, backward):
        if not backward:
            return lambda: fn(g, u)

        def run():
            torch.autograd.grad(fn(g, u), (g, u), dy)

        return run

    return factory


def providers(device: str) -> dict:
    out = {
        "reference": _step(swiglu_reference),
        "torch_eager": _step(swiglu_eager),
        "torch_compile": _step(torch.compile(swiglu_eager, dynamic=False)),
    }
    if fastllm.extension_available() and _backend.native_has("swiglu_fwd", torch.device(device)):
        out["fastllm_native"] = _step(lambda g, u: swiglu(g, u, backend="native"))
    if device == "cuda" and _backend.triton_error() is None:
        out["fastllm_triton"] = _step(lambda g, u: swiglu(g, u, backend="triton"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=default_device())
    p.add_argument("--rows", type=int, nargs="*", default=None)
    p.add_argument("--inter", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    rows = args.rows or ([4096, 16384] if gpu else [2048])
    inter = args.inter or ([8192, 14336] if gpu else [1536, 4864])
    dtypes = args.dtype or (["bfloat16", "float32"] if gpu else ["float32", "bfloat16"])
    cases = []
    for dt in dtypes:
        for r in rows:
            for i in inter:
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    params = {"rows": r, "inter": i, "dtype": dt, "mode": mode}
                    cases.append(
                        Case(
                            f"{r}x{i} {dt} {mode}",
                            params,
                            lambda r=r, i=i, dt=dt, b=backward: _inputs(
                                r, i, getattr(torch, dt), args.device, b
                            ),
                        )
                    )

    def bytes_moved(pr):
        elt = torch.finfo(getattr(torch, pr["dtype"])).bits // 8
        return (8 if pr["mode"] == "fwd+bwd" else 3) * pr["rows"] * pr["inter"] * elt

    return run_cases(
        "swiglu",
        cases,
        providers(args.device),
        args.device,
        bytes_fn=bytes_moved,
        baseline="torch_eager",
        reps=args.reps,
    )


if __name__ == "__main__":
    main()
