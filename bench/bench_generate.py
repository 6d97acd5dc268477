"""Rollout generation throughput: fastllm.generation.generate against Hugging Face
`generate` on the same weights, side by side in one run.

    python bench/bench_generate.py                          # CPU, or the GPU when there is one
    python bench/bench_generate.py --configs smollm2-135m --batch 16 --reps 3

Each case: `batch` prompts of `prompt` random tokens, `new` tokens each (no stop token, so
both engines emit exactly batch * new tokens), greedy or top-p 0.9 sampling (`--sampling`),
float32 on the CPU, bfloat16 on CUDA, random weights (the speed does not depend on their
values). `--lora` adds a LoRA policy (r=16 on q/k/v/o/gate/up/down, the PPO case): fastllm
with the adapters merged into cache-held weights (`fastllm_lora_merge`) and as one low-rank
term per projection group (`fastllm_lora_low_rank`), Hugging Face with peft's LoRA model.

    tokens/s        = batch * new / median wall time of the whole call (prefill included)
    decode ms/token = (time(new tokens) - time(1 token)) / (new - 1): the decode steps alone
    bound %         = weights + KV bytes read per decode step / decode step time, over the
                      measured device copy bandwidth (2 * bytes / time of a 1 GiB copy);
                      KV bytes at the mean context prompt + new/2. Meaningful at batch 1.
    matmul ms       = the decode step's matrix products alone (q/k/v, o, gate/up, down of every
                      layer and the head, on the model's own weights, at the step's batch) through
                      fastllm.ops.small_linear, as the step runs them: the floor a decode step can
                      approach on this device.
    blas ms         = the same products through F.linear (the wheel's BLAS), what Hugging Face's
                      step runs.

The providers of a case take turns, call after call (`reps` rounds of the whole call, then of
the 1-token call), so that a slow spell of a shared machine falls on both sides of a ratio.

Rows are appended as JSON lines to bench/results/generate.jsonl (device, versions, commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import default_device, environment, write_rows  # noqa: E402
from fastllm.generation import generate  # noqa: E402
from fastllm.models import build_model, preset  # noqa: E402
from fastllm.ops import small_linear  # noqa: E402

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


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_policies(model, hf):
    """The same LoRA adapters (r=16, alpha=32, non-zero B) on both models."""
    import copy

    import peft

    from fastllm.peft import apply_lora

    ours = copy.deepcopy(model)
    apply_lora(ours, target_modules=LORA_TARGETS, r=16, alpha=32)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    return ours.eval(), theirs.eval()


def providers(model, hf, device, sampling, lora=None):
    sample = {"temperature": 0.0} if sampling == "greedy" else {"temperature": 1.0, "top_p": 0.9}
    hf_sample = {"do_sample": False} if sampling == "greedy" else {"do_sample": True, "top_p": 0.9, "top_k": 0}

    def ours(m, graph=True, **kw):
        return lambda ids, new: generate(m, ids, new, use_cuda_graph=graph, **sample, **kw)

    def theirs(m):
        def run(ids, new):
            with torch.no_grad():
                return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  **hf_sample)
        return run

    if lora is not None:
        ours_lora, hf_lora = lora
        return {"hf_generate_lora": theirs(hf_lora), "fastllm_lora_merge": ours(ours_lora, lora="merge"),
                "fastllm_lora_low_rank": ours(ours_lora, lora="low_rank")}
    out = {"hf_generate": theirs(hf), "fastllm": ours(model)}
    if device.type == "cuda":
        out["fastllm_no_graph"] = ours(model, graph=False)
    return out


def matmul_floor(model, batch, device, reps, linear) -> float:
    """Median seconds of one decode step's matrix products alone through `linear` (see the
    module docstring)."""
    weights = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    weights.append(model.lm_head_weight.detach())
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def gemms():
        with torch.no_grad():
            for w in weights:
                linear(xs[w.shape[1]], w)
    gemms()
    return statistics.median(_time(gemms, device, max(reps, 3)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, nargs="*", default=None)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--sampling", nargs="*", default=["greedy", "top_p"], choices=["greedy", "top_p"])
    p.add_argument("--lora", action="store_true", help="also the LoRA-policy rows (needs peft)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    batches = args.batch or ([1, 4, 16, 64] if gpu else [1, 16, 64])
    reps = args.reps or (3 if gpu else 1)
    env = environment(device)
    bw = copy_bandwidth(device)
    print(f"\n## generate on {env['device']} (torch {env['torch']}, commit {env['commit']}), "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, {dtype}")
    header = (f"{'config':<14} {'batch':>5} {'sampling':<8} {'provider':<22} {'tokens/s':>10} {'x hf':>6} "
              f"{'median s':>9} {'decode ms/tok':>13} {'matmul ms':>9} {'blas ms':>8} {'bound %':>8}")
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
        lora = lora_policies(model, hf) if args.lora else None
        for batch, sampling, policy in [(b, s, p) for b in batches for s in args.sampling
                                        for p in ([None, lora] if lora else [None])]:
            ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt), device=device)
            floor = matmul_floor(model, batch, device, reps, small_linear)
            blas = matmul_floor(model, batch, device, reps, torch.nn.functional.linear)
            results = {}
            fns = providers(model, hf, device, sampling, policy)
            for fn in fns.values():
                fn(ids, 2)  # warm-up: kernel selection, allocator, graph capture path
            # interleaved turns (each provider's call in turn, rep after rep): a slow spell of the
            # machine falls on every provider alike instead of on whichever ran during it
            full, first = {p: [] for p in fns}, {p: [] for p in fns}
            for _ in range(reps):
                for pname, fn in fns.items():
                    full[pname] += _time(lambda fn=fn, ids=ids: fn(ids, args.new), device, 1)
            for _ in range(reps):
                for pname, fn in fns.items():
                    first[pname] += _time(lambda fn=fn, ids=ids: fn(ids, 1), device, 1)
            for pname in fns:
                full_t, first_t = full[pname], first[pname]
                med = statistics.median(full_t)
                decode = (med - statistics.median(first_t)) / (args.new - 1)
                ctx = args.prompt + args.new / 2
                kv_bytes = 2 * cfg.num_hidden_layers * batch * ctx * cfg.num_key_value_heads * cfg.head_dim * \
                    torch.finfo(dtype).bits // 8
                bound = (weight_bytes + kv_bytes) / decode / bw if decode > 0 else float("nan")
                results[pname] = (med, decode, bound, full_t)
                print(f"  ({cname} b{batch} {sampling} {pname}: {med:.2f} s for {args.new} tokens; calls "
                      f"{' '.join(f'{t:.2f}' for t in full_t)} s, 1 token {' '.join(f'{t:.2f}' for t in first_t)} s)",
                      flush=True)
            base_name = next(iter(results))  # the Hugging Face provider of this case
            base = results[base_name][0]
            for pname, (med, decode, bound, full) in results.items():
                tps = batch * args.new / med
                print(f"{cname:<14} {batch:>5} {sampling:<8} {pname:<22} {tps:>10.1f} {base / med:>6.2f} "
                      f"{med:>9.3f} {decode * 1e3:>13.2f} {floor * 1e3:>9.2f} {blas * 1e3:>8.2f} {100 * bound:>7.1f}%")
                rows.append({"bench": "generate", "case": f"{cname} b{batch} {sampling}" + (" lora" if policy else ""),
                             "config": cname, "batch": batch, "sampling": sampling, "lora": policy is not None,
                             "prompt": args.prompt, "new": args.new, "dtype": str(dtype).replace("torch.", ""),
                             "provider": pname, "median_s": med, "times_s": full, "tokens_per_s": tps,
                             "speedup_vs_baseline": base / med, "baseline": base_name,
                             "decode_ms_per_token": decode * 1e3, "matmul_floor_ms": floor * 1e3,
                             "blas_matmul_ms": blas * 1e3, "bandwidth_bound_fraction": bound,
                             "copy_gb_per_s": bw / 1e9, **env})
        del model, hf
    if not args.no_write:
        write_rows("generate", rows)
    return rows


if __name__ == "__main__":
    main()
