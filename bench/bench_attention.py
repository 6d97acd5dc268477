"""Attention forward and forward+backward: reference / torch SDPA (each backend the device
has) / fastllm (native on the CPU, Triton on CUDA), side by side in one run.

    python bench/bench_attention.py                       # CPU (small sizes), or the GPU
    python bench/bench_attention.py --seq 2048 4096 --head-dim 128 --dtype bfloat16

FLOPs (FlashAttention's convention): forward 4·B·H·T²·D (two matmuls of 2·B·H·T²·D),
halved for causal; backward 2.5x the forward, so forward+backward counts 3.5x.
TFLOP/s = FLOPs / median time. Batch x heads is sized so B·T = 16k tokens on the GPU
(heads = 2048 / D, FlashAttention's benchmark), and is small on the CPU.
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
from fastllm.ops import _backend, attention, attention_reference  # noqa: E402

REFERENCE_MAX_SEQ = 2048  # the reference and SDPA's math path materialise B·H·T² scores


def _inputs(batch, heads, seq, head_dim, dtype, device, causal, backward):
    g = lambda: torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device)
    q, k, v, dout = g(), g(), g(), g()
    return {"q": q, "k": k, "v": v, "dout": dout, "causal": causal, "backward": backward}


def _step(fn, layout="bthd"):
    """fn(q, k, v, causal) in (B, T, H, D) (layout "bthd") or (B, H, T, D) ("bhtd")."""
    def factory(q, k, v, dout, causal, backward):
        if layout == "bhtd":  # transposed once, outside the timed region
            q, k, v, dout = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
        q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
        if not backward:
            return lambda: fn(q, k, v, causal)

        def run():
            out = fn(q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), dout)
        return run
    return factory


def _sdpa(backend_enum):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        with sdpa_kernel([backend_enum]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def _reference(q, k, v, causal):
    return attention_reference(q, k, v, causal=causal)


def _guard_long(factory):
    """Skip (NotImplementedError) sequences whose T x T scores would dominate the run."""
    def guarded(q, k, v, dout, causal, backward):
        if q.shape[1] > REFERENCE_MAX_SEQ:
            raise NotImplementedError("the T x T scores are too large for this provider")
        return factory(q, k, v, dout, causal, backward)
    return guarded


def providers(device: str) -> dict:
    from torch.nn.attention import SDPBackend

    out = {"reference": _guard_long(_step(_reference))}
    if device == "cuda":
        sdpa = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}
    else:  # the CPU has the flash kernel (torch's own tiled CPU kernel) and the math path
        sdpa = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}
    for name, enum in sdpa.items():
        out[name] = _step(_sdpa(enum), layout="bhtd")
        if name == "sdpa_math":
            out[name] = _guard_long(out[name])
    if fastllm.extension_available() and _backend.native_has("attention_fwd", torch.device(device)):
        out["fastllm_native"] = _step(lambda q, k, v, c: attention(q, k, v, causal=c, backend="native"))
    if device == "cuda" and _backend.triton_error() is None:
        out["fastllm_triton"] = _step(lambda q, k, v, c: attention(q, k, v, causal=c, backend="triton"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--seq", type=int, nargs="*", default=None)
    p.add_argument("--head-dim", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--causal", nargs="*", default=None, choices=["0", "1"])
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # GPU defaults fit bench/gpu_check.sh's time budget; pass --seq 512 1024 2048 4096 8192
    # for the full sweep. Head dim 128 first: the target rows.
    seqs = args.seq or ([512, 2048, 8192] if gpu else [256, 512])
    head_dims = args.head_dim or [128, 64]
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32"])
    causals = [c == "1" for c in args.causal] if args.causal else [False, True]
    reps = args.reps or (10 if gpu else 5)
    cases = []
    for dt in dtypes:
        for d in head_dims:
            for t in seqs:
                heads = 2048 // d if gpu else 4
                batch = max(1, 16384 // t) if gpu else 1
                for causal in causals:
                    for backward in (False, True):
                        mode = "fwd+bwd" if backward else "fwd"
                        params = {"batch": batch, "heads": heads, "seq": t, "head_dim": d, "dtype": dt,
                                  "causal": causal, "mode": mode}
                        name = f"T{t} D{d} {'causal ' if causal else ''}{dt} {mode}"
                        cases.append(Case(name, params, lambda b=batch, h=heads, t=t, d=d, dt=dt, c=causal,
                                          bw=backward: _inputs(b, h, t, d, getattr(torch, dt), args.device, c, bw)))

    def flops(pr):
        f = 4 * pr["batch"] * pr["heads"] * pr["seq"] ** 2 * pr["head_dim"]
        f = f / 2 if pr["causal"] else f
        return f * (3.5 if pr["mode"] == "fwd+bwd" else 1.0)

    return run_cases("attention", cases, providers(args.device), args.device, flops_fn=flops,
                     baseline="sdpa_flash", reps=reps)


if __name__ == "__main__":
    main()
