"""Linear cross-entropy forward+backward: naive / torch.compile / fastllm (/ Liger-Kernel).

    python bench/bench_cross_entropy.py                       # CPU, or the GPU when there is one
    python bench/bench_cross_entropy.py --tokens 4096 --hidden 2048 --vocab 32768 131072

Every provider computes loss = CE(hidden @ weight.T, labels) (mean over the labels, ~10%
of them ignore_index) and the gradients of hidden and weight:
  naive          : the logits materialised, then F.cross_entropy (PyTorch eager)
  torch_compile  : the same function through torch.compile
  fastllm_native : fastllm.ops.linear_cross_entropy, C++ row kernels (CPU)
  fastllm_triton : fastllm.ops.linear_cross_entropy, Triton row kernels (GPU)
  liger          : Liger-Kernel's fused linear cross-entropy, where it is installed (GPU)
FLOPs: the three matmuls of forward+backward, 3 * 2 * N * H * V; TFLOP/s = FLOPs / median.
Peak memory is the allocation peak above the inputs during one forward+backward
(gradients included); "mem/base" divides it by the naive provider's.
Targets (issue 5): peak memory <= 25% of naive at V >= 32k on CPU and GPU; on a GPU time
<= 1.1x naive and at least Liger-Kernel's speed.
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
from fastllm.ops import _backend, linear_cross_entropy  # noqa: E402


def _inputs(tokens, hidden, vocab, dtype, device):
    h = torch.randn(tokens, hidden, dtype=dtype, device=device).requires_grad_(True)
    w = (torch.randn(vocab, hidden, dtype=dtype, device=device) * hidden ** -0.5).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), device=device)
    y[::10] = -100
    return {"h": h, "w": w, "y": y}


def _naive(h, w, y):
    return F.cross_entropy(h @ w.t(), y)


def _step(loss_fn):
    def factory(h, w, y):
        def run():
            loss = loss_fn(h, w, y)
            return torch.autograd.grad(loss, (h, w))
        return run
    return factory


def _liger():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None

    def loss_fn(h, w, y):
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y)
        return out[0] if isinstance(out, tuple) else out
    return loss_fn


def providers(device: str) -> dict:
    out = {"naive": _step(_naive)}
    compiled = torch.compile(_naive, dynamic=False)
    out["torch_compile"] = _step(compiled)
    if fastllm.extension_available() and _backend.native_has("xent_rows_", torch.device(device)):
        out["fastllm_native"] = _step(lambda h, w, y: linear_cross_entropy(h, w, y, backend="native"))
    if device.startswith("cuda") and _backend.triton_error() is None:
        out["fastllm_triton"] = _step(lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton"))
        liger = _liger()
        if liger is not None:
            out["liger"] = _step(liger)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--vocab", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # The CPU gets smaller problems (a forward+backward of 4096 x 2048 x 32k is 1.6 TFLOP).
    # Defaults fit the GPU check's per-bench time budget; pass --tokens 16384 --hidden 2048
    # 4096 --vocab 32768 128256 256000 for the full grid of the issue.
    tokens = args.tokens or ([4096] if gpu else [1024])
    hidden = args.hidden or ([4096] if gpu else [512])
    vocab = args.vocab or ([32768, 128256] if gpu else [32768, 65536])
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32"])
    cases = []
    for dt in dtypes:
        for n in tokens:
            for h in hidden:
                for v in vocab:
                    params = {"tokens": n, "hidden": h, "vocab": v, "dtype": dt, "mode": "fwd+bwd"}
                    cases.append(Case(f"{n}x{h}x{v} {dt}", params,
                                      lambda n=n, h=h, v=v, dt=dt: _inputs(n, h, v, getattr(torch, dt), args.device)))

    def flops(pr):
        return 3 * 2 * pr["tokens"] * pr["hidden"] * pr["vocab"]

    return run_cases("linear_cross_entropy", cases, providers(args.device), args.device, flops_fn=flops,
                     baseline="naive", reps=args.reps)


if __name__ == "__main__":
    main()
