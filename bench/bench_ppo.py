"""One PPO iteration (rollout + scoring + updates) on tiny and smollm2-135m shapes.

    python bench/bench_ppo.py                                   # CPU, or the GPU when there is one
    python bench/bench_ppo.py --configs smollm2-135m --batch 16 --new 64

Each case: `batch` prompts of `prompt` random tokens, `new` sampled tokens each (no stop token,
so every row emits exactly `new`), random weights (speed does not depend on them), a reward
model and a separate critic of the same shape, float32 on the CPU, bfloat16 autocast on CUDA.
The iteration is the trainer's own pieces (fastllm.train.ppo.collect_rollout, ppo_update:
ppo_epochs x num_minibatches optimizer steps). Reported:

    rollout / scoring / training s     wall time of each phase (median over reps)
    tokens/s (rollout)                 batch * new / rollout time
    tokens/s (scoring, training)       real tokens of the batch (x ppo_epochs for training) / time
    hf_generate tokens/s               Hugging Face `generate` (sampling) on the same weights, same run
    peak MB full-ref / shared-ref      peak memory of one iteration with LoRA on the policy: reference
                                       as a frozen full copy vs the same base with adapters disabled
                                       (CUDA allocator peak; on the CPU the bytes of the models'
                                       parameters and optimizer state, which is what differs)

Rows are appended as JSON lines to bench/results/ppo.jsonl (device, versions, commit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.bench_generate import hf_model  # noqa: E402
from bench.harness import default_device, environment, write_rows  # noqa: E402
from fastllm import models  # noqa: E402
from fastllm.peft import apply_lora, disable_adapters  # noqa: E402
from fastllm.train.common import autocast, build_optimizer, build_scheduler  # noqa: E402
from fastllm.train.config import PPOConfig  # noqa: E402
from fastllm.train.distributed import DistInfo  # noqa: E402
from fastllm.train.ppo import (  # noqa: E402,E501
    _TRAIN_STATS,
    ActorCritic,
    build_critic,
    collect_rollout,
    ppo_loss_fns,
    ppo_update,
)
from fastllm.train.rollout import policy_logprobs  # noqa: E402

CONFIGS = {"tiny": "tiny-llama", "smollm2-135m": "smollm2-135m"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def one_iteration(name, batch, prompt, new, device, dtype, *, lora=False, shared_ref=False, reps=1):
    torch.manual_seed(0)
    cfg_m = models.preset(CONFIGS[name])
    policy = models.build_model(cfg_m)
    reward = models.build_head_model(cfg_m, "sequence_classification", models.TaskHead(num_labels=1))
    value = build_critic(policy, reward, "separate")
    if lora:
        apply_lora(policy, r=8, alpha=16)
    ref = policy if shared_ref else copy.deepcopy(policy).requires_grad_(False)
    ctx = (lambda: disable_adapters(policy)) if shared_ref else contextlib.nullcontext
    cfg = PPOConfig(batch_size=batch, max_new_tokens=new, ppo_epochs=2, num_minibatches=2, grad_accum=1,
                    no_eos_score=None, kl_coef=0.05)
    ac = ActorCritic(policy, temperature=1.0, **value).to(device).eval()
    reward.to(device).eval().requires_grad_(False)
    ref.to(device).eval()

    def ref_logp(b):
        with ctx(), autocast(device, dtype):
            return policy_logprobs(ref, b, 1.0)[0]

    optimizer = build_optimizer(ac, 1e-5, 0.0)
    scheduler = build_scheduler(optimizer, warmup_steps=0, max_steps=100, schedule="constant")
    stats = torch.zeros(len(_TRAIN_STATS), dtype=torch.float64, device=device)
    loss_sum, count_fn = ppo_loss_fns(cfg, ac, lambda: 0.05, stats)
    prompts = torch.randint(3, cfg_m.vocab_size, (batch, prompt)).tolist()
    info = DistInfo()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {"rollout": [], "scoring": [], "training": []}
    for _ in range(reps + 1):  # the first is a warm-up
        with autocast(device, dtype):
            roll = collect_rollout(ac, prompts, cfg, reference_logprobs=ref_logp, reward_model=reward, reward_fn=None,
                                   eos_id=None, pad_id=0, kl_coef=0.05, info=info)
        _sync(device)
        t0 = time.perf_counter()
        ppo_update(roll["rows"], cfg, 0, ac, optimizer, scheduler, info, device=device, dtype=dtype,
                   loss_sum=loss_sum, count_fn=count_fn)
        _sync(device)
        for k in ("rollout", "scoring"):
            times[k].append(roll["times"][k])
        times["training"].append(time.perf_counter() - t0)
    for k in times:
        times[k] = statistics.median(times[k][1:])
    real = int(roll["batch"].attention_mask.sum())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t))
        peak = (_bytes(ac, ref, reward) + opt_bytes) / 2**20
    return {"times": times, "real_tokens": real, "peak_mb": peak, "policy": policy}


def hf_tokens_per_s(policy, batch, prompt, new, device, dtype, reps):
    hf = hf_model(policy, device, dtype)
    ids = torch.randint(3, policy.config.vocab_size, (batch, prompt), device=device)
    ts = []
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=True, top_k=0)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return batch * new / statistics.median(ts[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default=default_device())
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    rows = []
    print(f"{'config':<13} {'rollout s':>9} {'scoring s':>9} {'training s':>10} {'roll tok/s':>10} "
          f"{'hf tok/s':>9} {'x hf':>5} {'MB full-ref':>11} {'MB shared':>9}")
    for name in args.configs:
        full = one_iteration(name, args.batch, args.prompt, args.new, device, dtype, reps=args.reps)
        hf = hf_tokens_per_s(full.pop("policy"), args.batch, args.prompt, args.new, device, dtype, args.reps)
        lora_full = one_iteration(name, args.batch, args.prompt, args.new, device, dtype, lora=True, reps=1)
        lora_shared = one_iteration(name, args.batch, args.prompt, args.new, device, dtype, lora=True,
                                    shared_ref=True, reps=1)
        t = full["times"]
        roll_tps = args.batch * args.new / t["rollout"]
        row = {"bench": "ppo", "config": name, "batch": args.batch, "prompt": args.prompt, "new": args.new,
               "dtype": str(dtype).removeprefix("torch."), "rollout_s": t["rollout"], "scoring_s": t["scoring"],
               "training_s": t["training"], "rollout_tokens_per_s": roll_tps,
               "scoring_tokens_per_s": full["real_tokens"] / t["scoring"],
               "training_tokens_per_s": full["real_tokens"] * 2 / t["training"],
               "hf_generate_tokens_per_s": hf, "rollout_speedup_vs_hf": roll_tps / hf,
               "peak_mb_full_model": full["peak_mb"], "peak_mb_lora_full_ref": lora_full["peak_mb"],
               "peak_mb_lora_shared_ref": lora_shared["peak_mb"],
               "peak_kind": "cuda allocator peak" if device.type == "cuda" else "parameter + optimizer bytes",
               **env}
        rows.append(row)
        print(f"{name:<13} {t['rollout']:>9.3f} {t['scoring']:>9.3f} {t['training']:>10.3f} {roll_tps:>10.0f} "
              f"{hf:>9.0f} {roll_tps / hf:>5.2f} {lora_full['peak_mb']:>11.1f} {lora_shared['peak_mb']:>9.1f}")
    write_rows("ppo", rows)


if __name__ == "__main__":
    main()
