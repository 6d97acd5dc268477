"""RMSNorm forward and forward+backward: reference / torch eager / torch.compile / fastllm.

    python bench/bench_rms_norm.py                 # CPU, or the GPU when there is one
    python bench/bench_rms_norm.py --rows 4096 --hidden 4096 --dtype float32

Bytes moved (the op is memory-bound): forward reads x and writes y (2·R·H elements);
forward+backward adds reading dy and x and writing dx (5·R·H in all); weight traffic is
negligible. GB/s = bytes / median time.
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
from fastllm.ops import _backend, rms_norm, rms_norm_reference  # noqa: E402

EPS = 1e-6


def _inputs(rows, hidden, dtype, device, backward):
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=backward)
    w = (1 + 0.1 * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_(backward)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    return {"x": x, "w": w, "dy": dy, "backward": backward}


def _step(fn):
    def factory(x, w, dy, backward):
        if not backward:
            return lambda: fn(x, w)

        def run():
            y = fn(x, w)
            torch.autograd.grad(y, (x, w), dy)
        return run
    return factory


def providers(device: str) -> dict:
    out = {
        "reference": _step(lambda x, w: rms_norm_reference(x, w, EPS)),
        "torch_eager": _step(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)),
    }
    # One compiled graph per shape (dynamic=False): allow every case its own entry.
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS), dynamic=False)
    out["torch_compile"] = _step(compiled)
    if fastllm.extension_available() and _backend.native_has("rms_norm_fwd", torch.device(device)):
        out["fastllm_native"] = _step(lambda x, w: rms_norm(x, w, EPS, backend="native"))
    if device == "cuda" and _backend.triton_error() is None:
        out["fastllm_triton"] = _step(lambda x, w: rms_norm(x, w, EPS, backend="triton"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--rows", type=int, nargs="*", default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    rows = args.rows or ([16384] if gpu else [4096])
    hidden = args.hidden or ([1024, 4096] if gpu else [1000, 4096])
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32", "bfloat16"])
    cases = []
    for dt in dtypes:
        for r in rows:
            for h in hidden:
                for backward in (False, True):
                    params = {"rows": r, "hidden": h, "dtype": dt, "mode": "fwd+bwd" if backward else "fwd"}
                    make = lambda r=r, h=h, dt=dt, b=backward: _inputs(r, h, getattr(torch, dt), args.device, b)
                    cases.append(Case(f"{r}x{h} {dt} {params['mode']}", params, make))

    def bytes_moved(pr):
        elt = torch.finfo(getattr(torch, pr["dtype"])).bits // 8
        return (5 if pr["mode"] == "fwd+bwd" else 2) * pr["rows"] * pr["hidden"] * elt

    return run_cases("rms_norm", cases, providers(args.device), args.device, bytes_fn=bytes_moved,
                     baseline="torch_eager", reps=args.reps)


if __name__ == "__main__":
    main()
