"""Training-step throughput and peak memory: full SFT and LoRA SFT, fastllm against the same
model in Hugging Face transformers (+ peft for LoRA), side by side in one run.

    python bench/bench_train.py                          # CPU, or the GPU when there is one
    python bench/bench_train.py --configs smollm2-135m --seq 512 --modes lora
    python bench/bench_train.py --configs tiny-llama --hf-compile   # + transformers under torch.compile

One step = forward + loss + backward + AdamW step + zero_grad on one (batch, seq) block of
random tokens (all positions labelled). tokens/s = batch * seq / median step time. The
providers and the linear floor (below) are timed in turns, one step each per round (order
reversed every other round), so a machine whose speed drifts over minutes moves them together. Peak
memory is what the step allocates above the model and optimizer state already in place (CUDA:
the caching allocator's peak; CPU: the allocations torch.profiler records): activations,
logits, gradients. Each row also records `losses`, the mean token loss of every step run
(warm-up, timed, memory), so a run shows both sides train the same objective. The floor is
the step's linear-layer products alone through torch's BLAS (`linear_floor`, timed in the same
rounds) as a share of the provider's median step (printed as "floor N%"); the "linear floor"
line gives transformers' median over it: what transformers spends beyond its products. fastllm
runs most of these products through its own kernel on the CPU (faster than the BLAS here), so
its share can pass 100%. Both sides:
the same config (fastllm preset -> HF LlamaConfig), float32 on the CPU and bfloat16 autocast
on the GPU, SDPA attention for transformers, LoRA rank 16 (--lora-rank; 8 before 2026-12-01),
alpha twice the rank, on q/k/v/o/gate/up/down with the base frozen, torch's fused AdamW (Hugging
Face's Trainer default on torch >= 2.8).

--hf-compile adds a third provider, "transformers+compile", run after "transformers": the same
model, LoRA setup, optimizer and batch with the model wrapped by torch.compile (Inductor, default
mode; the AdamW step stays eager). Off by default: compiling a 30-layer model on a small CPU
takes minutes. The compiling call (forward + backward, no optimizer step, so the weights and the
loss sequence stay step for step those of eager transformers) runs before timing starts; its
wall seconds are printed and recorded as `compile_s` (much less when Inductor's on-disk cache
holds an earlier run's kernels). "x HF tok/s" and "mem/HF" stay relative to eager transformers.
If torch.compile fails (say, no C++ compiler) the row reads n/a.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastllm  # noqa: E402,F401
from bench.harness import default_device, environment, peak_memory_mb, time_interleaved, write_rows  # noqa: E402
from fastllm import models  # noqa: E402
from fastllm.train.common import CausalLMLoss, autocast, build_optimizer  # noqa: E402

HF_COMPILE = "transformers+compile"  # opt-in: --hf-compile
FLOOR = "linear floor"  # the step's products alone, through BLAS
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16  # the default of --lora-rank; alpha is twice the rank on both sides
TINY = "tiny-llama"


def _config(name: str, seq: int):
    overrides = {"max_position_embeddings": max(seq, 128)} if name == TINY else {}
    return models.preset(name, **overrides)


def _batch(cfg, batch: int, seq: int, device):
    """input_ids (B, seq) and fastllm's pre-shifted labels: the next token, -100 at the last
    position, so both sides score the same seq-1 targets (transformers shifts labels=input_ids)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)
    return ids.to(device), labels.to(device)


def fastllm_step(cfg, mode, batch, seq, device, dtype, lora_rank: int = LORA_RANK):
    torch.manual_seed(0)
    model = models.build_model(cfg).to(device)
    if mode == "lora":
        try:
            import fastllm.peft as peft
        except ImportError as exc:
            raise NotImplementedError("fastllm.peft is not available") from exc
        if not hasattr(peft, "apply_lora"):
            raise NotImplementedError("fastllm.peft.apply_lora is not available")
        peft.apply_lora(model, target_modules=LORA_TARGETS, r=lora_rank, alpha=2 * lora_rank)
        model.to(device)
    module = CausalLMLoss(model)
    opt = build_optimizer(module, lr=1e-4, weight_decay=0.0)
    inputs, labels = _batch(cfg, batch, seq, device)
    n = int((labels != -100).sum())

    def step():
        with autocast(device, dtype):
            loss = module(inputs, labels) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def hf_step(cfg, mode, batch, seq, device, dtype, compile: bool = False, lora_rank: int = LORA_RANK):
    try:
        import transformers
    except ImportError as exc:
        raise NotImplementedError("transformers is not installed") from exc
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)
    if mode == "lora":
        try:
            import peft
        except ImportError as exc:
            raise NotImplementedError("peft is not installed") from exc
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as Hugging Face's Trainer (and TRL's) default optimizer is on torch >= 2.8
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    inputs, _ = _batch(cfg, batch, seq, device)
    if compile:
        model = torch.compile(model)  # Inductor, default mode; lazy: compiles on the first call

    def step(update: bool = True):
        with autocast(device, dtype):
            out = model(input_ids=inputs, labels=inputs)
        out.loss.backward()
        if update:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    if compile:
        # compile (forward and backward graphs) here, before any timed or warm-up call; no
        # optimizer step, so the weights stay where eager transformers starts
        t0 = time.perf_counter()
        try:
            float(step(update=False))  # float(): waits for the device
        except Exception as exc:
            reason = str(exc).strip().splitlines()
            raise NotImplementedError(f"torch.compile failed: {type(exc).__name__}"
                                      + (f": {reason[0]}" if reason else "")) from exc
        step.compile_s = time.perf_counter() - t0
    return step


def linear_floor(cfg, mode, batch, seq, device, dtype):
    """A callable running the step's linear-layer products alone, through torch's BLAS at the step's
    batch * seq rows: for every layer's q, k, v, o, gate, up and down and for the tied head, the
    forward x W^T and the input gradient dy W, plus in full mode the weight gradient dy^T x (the
    head in 256-row chunks, as fastllm's fused cross-entropy runs it). Every provider runs these
    products; on BLAS (transformers) median / floor is what its step spends on everything else
    (attention, elementwise work, optimizer, overhead)."""
    h, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or h // heads
    shapes = [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d), (cfg.intermediate_size, h),
              (cfg.intermediate_size, h), (h, cfg.intermediate_size)] * cfg.num_hidden_layers
    rows = batch * seq
    g = torch.Generator(device="cpu").manual_seed(0)
    new = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    weights = [new(o, i) for o, i in shapes]
    head = new(cfg.vocab_size, h)
    xs = {n: new(rows, n) for n in {i for _, i in shapes} | {o for o, _ in shapes}}
    chunk = min(256, rows)
    hx, hdy = new(chunk, h), new(chunk, cfg.vocab_size)

    def products():
        with torch.no_grad():
            for w in weights:
                out, inp = w.shape
                torch.mm(xs[inp], w.t())
                torch.mm(xs[out], w)
                if mode == "full":
                    torch.mm(xs[out].t(), xs[inp])
            for _ in range(0, rows, chunk):
                torch.mm(hx, head.t())
                torch.mm(hdy, head)
                if mode == "full":
                    torch.mm(hdy.t(), hx)
    return products


PROVIDERS = {"fastllm": fastllm_step, "transformers": hf_step, HF_COMPILE: functools.partial(hf_step, compile=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--configs", nargs="*", default=[TINY, "smollm2-135m"])
    p.add_argument("--modes", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=None, help="default: 1 on the CPU, 8 on the GPU")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default: 3 on the CPU, 20 on the GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--hf-compile", action="store_true",
                   help=f"also run {HF_COMPILE}: transformers under torch.compile (slow to compile)")
    p.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank in lora mode, both sides (alpha: 2x)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.lora_rank < 1:
        p.error(f"--lora-rank: expected a positive integer, got {args.lora_rank}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (8 if gpu else 1)
    reps = args.reps or (20 if gpu else 3)
    dtype = torch.bfloat16 if gpu else torch.float32
    env = environment(device)
    print(f"\n## train step on {env['device']} (torch {env['torch']}, commit {env['commit']}), "
          f"batch {batch} x seq {args.seq}, {dtype}, threads {torch.get_num_threads()}, LoRA rank {args.lora_rank}")
    header = (f"{'config':<14} {'mode':<5} {'provider':<20} {'median ms':>10} {'p20-p80 ms':>17} {'tokens/s':>9} "
              f"{'peak MiB':>9} {'x HF tok/s':>10} {'mem/HF':>7}")
    print(header)
    print("-" * len(header))
    providers = {k: f for k, f in PROVIDERS.items() if k != HF_COMPILE or args.hf_compile}
    rows = []
    for name in args.configs:
        cfg = _config(name, args.seq)
        for mode in args.modes:
            steps, losses, compile_s = {}, {}, {}
            for pname, factory in providers.items():
                try:
                    step = factory(cfg, mode, batch, args.seq, device, dtype, lora_rank=args.lora_rank)
                except NotImplementedError as exc:
                    print(f"{name:<14} {mode:<5} {pname:<20} n/a: {exc}")
                    continue
                compile_s[pname] = getattr(step, "compile_s", None)
                losses[pname] = []  # mean token loss of every step run, in order (read after timing: no sync)

                def recorded(step=step, losses=losses[pname]):
                    losses.append(step())
                steps[pname] = recorded
            if not steps:
                continue
            floor_fn = linear_floor(cfg, mode, batch, args.seq, device, dtype)
            # every provider and the floor in turns, so all see the same moments of the machine
            times = time_interleaved({**steps, FLOOR: floor_fn}, device, warmup=1, reps=reps, max_seconds=600.0)
            floor = statistics.median(times.pop(FLOOR))
            results = {}
            for pname, recorded in steps.items():
                peak = peak_memory_mb(recorded, device)
                t = times[pname]
                q = statistics.quantiles(t, n=5) if len(t) >= 2 else [t[0]] * 4
                results[pname] = (statistics.median(t), q[0], q[3], peak, len(t),
                                  [round(float(x), 6) for x in losses[pname]], compile_s[pname])
                if gpu:
                    torch.cuda.empty_cache()
            del steps, floor_fn
            base = results.get("transformers")
            for pname, (med, p20, p80, peak, n, step_losses, seconds) in results.items():
                tok_s = batch * args.seq / (med * 1e-3)
                speed = base[0] / med if base else None
                mem = peak / base[3] if base and base[3] > 0 else None
                print(f"{name:<14} {mode:<5} {pname:<20} {med:>10.1f} {f'{p20:.1f}-{p80:.1f}':>17} {tok_s:>9.0f} "
                      f"{peak:>9.1f} {'-' if speed is None else f'{speed:.2f}':>10} "
                      f"{'-' if mem is None else f'{mem:.2f}':>7}  loss {step_losses[0]:.4f} -> {step_losses[-1]:.4f}"
                      f"  floor {100 * floor / med:.0f}%"
                      + ("" if seconds is None else f"  compile {seconds:.1f} s"))
                rows.append({"bench": "train", "case": f"{name} {mode} b{batch}x{args.seq}", "config": name,
                             "mode": mode, "provider": pname, "batch": batch,
                             "lora_rank": args.lora_rank if mode == "lora" else None,
                             "seq": args.seq, "dtype": str(dtype), "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                             "reps": n, "tokens_per_s": tok_s, "peak_mib": peak, "tokens_per_s_vs_hf": speed,
                             "memory_vs_hf": mem, "speedup_vs_baseline": speed, "memory_vs_baseline": mem,
                             "baseline": "transformers" if base else None, "losses": step_losses,
                             "linear_floor_ms": floor, "floor_share": floor / med, "timing": "interleaved",
                             **({} if seconds is None else {"compile_s": seconds}), **env})
            print(f"{name:<14} {mode:<5} {FLOOR:<20} {floor:>10.1f}"
                  + (f"   (transformers / floor: {base[0] / floor:.2f}x; the products alone through BLAS)"
                     if base else ""))
    if not args.no_write:
        write_rows("train", rows)


if __name__ == "__main__":
    main()
