"""Rollout generation throughput: fastllm.generation.generate against Hugging Face
`generate` on the same weights, side by side in one run.

    python bench/bench_generate.py                          # CPU, or the GPU when there is one
    python bench/bench_generate.py --configs smollm2-135m --batch 16 --reps 3

Each case: `batch` prompts of `prompt` random tokens, `new` greedy tokens each (no stop
token, so both engines emit exactly batch * new tokens), float32 on the CPU, bfloat16 on
CUDA, random weights (the speed does not depend on their values).

    tokens/s        = batch * new / median wall time of the whole call (prefill included)
    decode ms/token = (time(new tokens) - time(1 token)) / (new - 1): the decode steps alone
    bound %         = weights + KV bytes read per decode step / decode step time, over the
                      measured device copy bandwidth (2 * bytes / time of a 1 GiB copy);
                      KV bytes at the mean context prompt + new/2. Meaningful at batch 1.

Rows are appended as JSON lines to bench/results/generate.jsonl (device, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import RESULTS_DIR, default_device, environment  # noqa: E402
from fastllm.generation import generate  # noqa: E402
from fastllm.models import build_model, preset  # noqa: E402

CONFIGS = {"tiny": "tiny-llama", "smollm2-135m": "smollm2-135m"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device) -> float:
    """Device memory bandwidth in bytes/s from a 1 GiB (CPU: 256 MiB) copy: 2 * bytes / time."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = min(_time(lambda: dst.copy_(src), device, 5))
    return 2 * n / t


def hf_model(ours, device, dtype):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**ours.config.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not ours.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map 1:1: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def providers(model, hf, device):
    def ours(graph):
        return lambda ids, new: generate(model, ids, new, temperature=0.0, use_cuda_graph=graph)

    def theirs(ids, new):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False)

    out = {"hf_generate": theirs, "fastllm": ours(True)}
    if device.type == "cuda":
        out["fastllm_no_graph"] = ours(False)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, nargs="*", default=None)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    batches = args.batch or ([1, 4, 16, 64] if gpu else [1, 16])
    reps = args.reps or (3 if gpu else 1)
    env = environment(device)
    bw = copy_bandwidth(device)
    print(f"\n## generate on {env['device']} (torch {env['torch']}, commit {env['commit']}), "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, {dtype}")
    header = (f"{'config':<14} {'batch':>5} {'provider':<17} {'tokens/s':>10} {'x hf':>6} {'median s':>9} "
              f"{'decode ms/tok':>13} {'bound %':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for cname in args.configs:
        torch.manual_seed(0)
        # the tiny test preset has 128 positions: give it room for prompt + new tokens
        extra = {"max_position_embeddings": 1024} if cname == "tiny" else {}
        model = build_model(preset(CONFIGS[cname], **extra)).to(device=device, dtype=dtype).eval()
        hf = hf_model(model, device, dtype)
        cfg = model.config
        weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        for batch in batches:
            ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt), device=device)
            results = {}
            for pname, fn in providers(model, hf, device).items():
                fn(ids, 2)  # warm-up: kernel selection, allocator, graph capture path
                full = _time(lambda: fn(ids, args.new), device, reps)
                first = _time(lambda: fn(ids, 1), device, reps)
                med = statistics.median(full)
                decode = (med - statistics.median(first)) / (args.new - 1)
                ctx = args.prompt + args.new / 2
                kv_bytes = 2 * cfg.num_hidden_layers * batch * ctx * cfg.num_key_value_heads * cfg.head_dim * \
                    torch.finfo(dtype).bits // 8
                bound = (weight_bytes + kv_bytes) / decode / bw if decode > 0 else float("nan")
                results[pname] = (med, decode, bound, full)
                print(f"  ({cname} b{batch} {pname}: {med:.2f} s for {args.new} tokens)", flush=True)
            base = results["hf_generate"][0]
            for pname, (med, decode, bound, full) in results.items():
                tps = batch * args.new / med
                print(f"{cname:<14} {batch:>5} {pname:<17} {tps:>10.1f} {base / med:>6.2f} {med:>9.3f} "
                      f"{decode * 1e3:>13.2f} {100 * bound:>7.1f}%")
                rows.append({"bench": "generate", "case": f"{cname} b{batch}", "config": cname, "batch": batch,
                             "prompt": args.prompt, "new": args.new, "dtype": str(dtype).replace("torch.", ""),
                             "provider": pname, "median_s": med, "times_s": full, "tokens_per_s": tps,
                             "speedup_vs_baseline": base / med, "baseline": "hf_generate",
                             "decode_ms_per_token": decode * 1e3, "bandwidth_bound_fraction": bound,
                             "copy_gb_per_s": bw / 1e9, **env})
        del model, hf
    if rows and not args.no_write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, "generate.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
