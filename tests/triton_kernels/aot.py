"""Ahead-of-time compilation of the Triton kernels for CUDA targets, without a GPU.

Every module under triton_kernels/ lists the variants its launcher can choose on a GPU
(`launch_configs()`, built from the launcher's own config function). `compile_spec` turns one
into a cubin for a given compute capability with `triton.compile`; nothing here needs a
driver. Pointers and integer arguments get the divisibility-by-16 hint a launch gives
aligned tensors and strides: the specialisation with the widest loads and the deepest
software pipelining, so the one that needs the most shared memory.

Run as `python -m tests.triton_kernels.aot CAPABILITY [WORKERS]` with TRITON_INTERPRET unset:
reads spec ids (one per line) on stdin, compiles them in a process pool and prints one JSON
line per spec: {"id", "cc", "shared", "num_warps", "error"}.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

MODULES = ("attention_fwd", "attention_bwd", "cross_entropy", "lora_linear", "rms_norm", "rope", "swiglu")

# Shared memory one block may use (the opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}  # A100: 163 KiB; H100/H200: 227 KiB


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # the interpreter wraps the Python function
    return fn.__name__


def spec_id(spec) -> str:
    """A stable, readable name: kernel, dtype of the first pointer, constexprs, warps/stages."""
    import torch

    first = next(iter(spec.pointers.values()))
    consts = ",".join(f"{k}={_short(v)}" for k, v in spec.constexprs.items())
    dtype = str(first).replace("torch.", "") if isinstance(first, torch.dtype) else str(first)
    return f"{kernel_name(spec.kernel)}-{dtype}-{consts}-w{spec.num_warps}s{spec.num_stages}"


def _short(value) -> str:
    return str(value).replace("triton.language.", "").replace("True", "T").replace("False", "F")


def all_specs() -> dict:
    """{spec id: LaunchSpec} over every module's launch_configs(), in a fixed order."""
    specs = {}
    for name in MODULES:
        module = importlib.import_module(f"fastllm.triton_kernels.{name}")
        for spec in module.launch_configs():
            key = spec_id(spec)
            if key in specs:
                raise ValueError(f"triton_kernels/{name}.py: launch_configs() lists {key} twice")
            specs[key] = spec
    return specs


def _type(dtype) -> str:
    from triton.runtime.jit import type_canonicalisation_dict

    return type_canonicalisation_dict[str(dtype).replace("torch.", "")]


def compile_spec(spec, capability: int):
    """triton.compile of one spec for sm_<capability>; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec.kernel
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
            continue
        if arg in spec.pointers:
            signature[arg] = "*" + _type(spec.pointers[arg])
        elif arg in spec.floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
        if signature[arg] != "fp32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in spec.constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr argument(s) {missing}")
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


_SPECS: dict = {}


def _compile_one(key: str, capability: int) -> dict:
    start = time.perf_counter()
    try:
        compiled = compile_spec(_SPECS[key], capability)
        result = {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps, "error": None}
    except Exception as exc:  # reported per spec by the test
        result = {"shared": None, "num_warps": None, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
    return {"id": key, "cc": capability, "seconds": round(time.perf_counter() - start, 2), **result}


def main(argv: list[str]) -> int:
    import concurrent.futures
    import multiprocessing

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    capabilities = [int(c) for c in argv[0].split(",")]
    workers = int(argv[1]) if len(argv) > 1 else 1
    _SPECS.update(all_specs())
    keys = [line.strip() for line in sys.stdin if line.strip()]
    unknown = [k for k in keys if k not in _SPECS]
    if unknown:
        print(f"aot: unknown spec ids {unknown[:3]}", file=sys.stderr)
        return 2
    # The slowest first (attention, then the matmul) so the pool ends together.
    order = sorted(keys, key=lambda k: (not k.startswith("_attn"), not k.startswith("_matmul")))
    jobs = [(k, c) for k in order for c in capabilities]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for result in pool.map(_compile_one, *zip(*jobs)) if jobs else []:
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
