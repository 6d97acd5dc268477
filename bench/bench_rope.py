"""RoPE on q and k, forward and forward+backward: reference / torch eager (Hugging Face's
rotate_half formula) / torch.compile / fastllm.

    python bench/bench_rope.py                     # CPU, or the GPU when there is one
    python bench/bench_rope.py --tokens 4096 --heads 32 8 --head-dim 128 --dtype bfloat16

Bytes moved (memory-bound): forward reads q and k and writes both (2·N·(Hq+Hkv)·D elements,
cos/sin rows are N·D and negligible next to them); forward+backward adds reading dq, dk
and writing their gradients (4·N·(Hq+Hkv)·D in all). GB/s = bytes / median time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastllm  # noqa: E402
from bench.harness import Case, default_device, run_cases  # noqa: E402
from fastllm.ops import _backend, apply_rope, rope_cos_sin, rope_inv_freq, rope_reference  # noqa: E402


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_eager(q, k, cos, sin):
    """What a Hugging Face Llama layer runs: cos/sin duplicated to D, in q's dtype."""
    c = torch.cat((cos, cos), dim=-1).to(q.dtype).unsqueeze(-2)  # (B, T, 1, D)
    s = torch.cat((sin, sin), dim=-1).to(q.dtype).unsqueeze(-2)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _inputs(tokens, hq, hkv, d, dtype, device, backward):
    q = torch.randn(1, tokens, hq, d, dtype=dtype, device=device, requires_grad=backward)
    k = torch.randn(1, tokens, hkv, d, dtype=dtype, device=device, requires_grad=backward)
    cos, sin = rope_cos_sin(rope_inv_freq(d), torch.arange(tokens, device=device)[None])
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    return {"q": q, "k": k, "cos": cos, "sin": sin, "dq": dq, "dk": dk, "backward": backward}


def _step(fn):
    def factory(q, k, cos, sin, dq, dk, backward):
        if not backward:
            return lambda: fn(q, k, cos, sin)

        def run():
            qo, ko = fn(q, k, cos, sin)
            torch.autograd.grad((qo, ko), (q, k), (dq, dk))

        return run

    return factory


def providers(device: str) -> dict:
    out = {
        "reference": _step(rope_reference),
        "torch_eager": _step(rope_eager),
        "torch_compile": _step(torch.compile(rope_eager, dynamic=False)),
    }
    if fastllm.extension_available() and _backend.native_has("rope_fwd", torch.device(device)):
        out["fastllm_native"] = _step(lambda q, k, c, s: apply_rope(q, k, c, s, backend="native"))
    if device == "cuda" and _backend.triton_error() is None:
        out["fastllm_triton"] = _step(lambda q, k, c, s: apply_rope(q, k, c, s, backend="triton"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=default_device())
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    tokens = args.tokens or ([4096, 16384] if gpu else [2048])
    hq, hkv = args.heads or (32, 8)  # Llama-3 8B layout
    d = args.head_dim or (128 if gpu else 64)
    dtypes = args.dtype or (["bfloat16", "float32"] if gpu else ["float32", "bfloat16"])
    cases = []
    for dt in dtypes:
        for n in tokens:
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                params = {
                    "tokens": n,
                    "hq": hq,
                    "hkv": hkv,
                    "head_dim": d,
                    "dtype": dt,
                    "mode": mode,
                }
                cases.append(
                    Case(
                        f"{n}x({hq}+{hkv})x{d} {dt} {mode}",
                        params,
                        lambda n=n, dt=dt, b=backward: _inputs(
                            n, hq, hkv, d, getattr(torch, dt), args.device, b
                        ),
                    )
                )

    def bytes_moved(pr):
        elt = torch.finfo(getattr(torch, pr["dtype"])).bits // 8
        return (
            (4 if pr["mode"] == "fwd+bwd" else 2)
            * pr["tokens"]
            * (pr["hq"] + pr["hkv"])
            * pr["head_dim"]
            * elt
        )

    return run_cases(
        "rope",
        cases,
        providers(args.device),
        args.device,
        bytes_fn=bytes_moved,
        baseline="torch_eager",
        reps=args.reps,
    )


if __name__ == "__main__":
    main()
