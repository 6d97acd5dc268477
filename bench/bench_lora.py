"""LoRA linear forward+backward: the frozen base linear alone / an unfused PEFT-style LoRA /
fastllm's fused op, side by side in one run.

    python bench/bench_lora.py                       # CPU, or the GPU when there is one
    python bench/bench_lora.py --tokens 4096 --hidden 4096 --rank 8 64 --dtype bfloat16

Every provider does one forward and one backward of a (hidden -> hidden) projection on
`tokens` rows, with x requiring grad (as inside a network) and the weight frozen:
  base_frozen   : y = x W^T + b                              (dx only: the floor LoRA adds to)
  peft_unfused  : y = base(x) + lora_B(lora_A(x)) * s        (what PEFT's LoRA layer runs)
  fastllm_*     : fastllm.ops.lora_linear                     (no dW, no (rows, out) branch)
FLOPs (same work model for every row, so TFLOP/s compare directly):
  4·N·in·out (base forward + dx) + 6·N·r·(in + out) (the LoRA products, forward and backward).
The ratio columns divide by base_frozen: "x base" < 1 is the LoRA overhead.
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
from fastllm.ops import _backend, lora_linear  # noqa: E402

SCALE = 2.0


def _inputs(tokens, hidden, rank, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)  # on the device: CPU randn of 16384x4096 is slow

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    x = rnd(tokens, hidden).requires_grad_()
    w = rnd(hidden, hidden, std=hidden ** -0.5)
    b = rnd(hidden)
    a = rnd(rank, hidden, std=hidden ** -0.5).requires_grad_()
    bb = rnd(hidden, rank, std=0.02).requires_grad_()
    dy = rnd(tokens, hidden)
    return {"x": x, "w": w, "b": b, "a": a, "bb": bb, "dy": dy}


def _base_frozen(x, w, b, a, bb, dy):
    def run():
        y = F.linear(x, w, b)
        torch.autograd.grad(y, (x,), dy)
    return run


def _peft_unfused(x, w, b, a, bb, dy):
    def run():
        y = F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * SCALE
        torch.autograd.grad(y, (x, a, bb), dy)
    return run


def _fused(backend):
    def factory(x, w, b, a, bb, dy):
        def run():
            y = lora_linear(x, w, b, a, bb, SCALE, backend=backend)
            torch.autograd.grad(y, (x, a, bb), dy)
        return run
    return factory


def providers(device: str) -> dict:
    out = {"base_frozen": _base_frozen, "peft_unfused": _peft_unfused}
    dev = torch.device(device)
    if fastllm.extension_available() and _backend.native_has("lora_linear_fwd", dev):
        out["fastllm_native"] = _fused("native")
    if dev.type == "cuda" and _backend.triton_error() is None:
        out["fastllm_triton"] = _fused("triton")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--rank", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    tokens = args.tokens or ([4096, 16384] if gpu else [2048])
    hidden = args.hidden or ([2048, 4096] if gpu else [1024])
    ranks = args.rank or [8, 64]
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32"])
    cases = []
    for dt in dtypes:
        for n in tokens:
            for h in hidden:
                for r in ranks:
                    params = {"tokens": n, "hidden": h, "rank": r, "dtype": dt, "mode": "fwd+bwd"}
                    cases.append(Case(f"{n}x{h} r{r} {dt}", params,
                                      lambda n=n, h=h, r=r, dt=dt: _inputs(n, h, r, getattr(torch, dt), args.device)))

    def flops(pr):
        n, h, r = pr["tokens"], pr["hidden"], pr["rank"]
        return 4 * n * h * h + 6 * n * r * (h + h)

    return run_cases("lora_linear", cases, providers(args.device), args.device, flops_fn=flops,
                     baseline="base_frozen", reps=args.reps)


if __name__ == "__main__":
    main()
