"""Threading on small shapes: a tiny model's training step and a tiny-model `generate` call at
one thread and at the default thread count, side by side in one run.

    python bench/bench_threads.py                      # tiny-llama, 1 thread vs the default
    python bench/bench_threads.py --threads 1 2 4 --reps 30

The C++ kernels run inline when a call holds too little work to pay for a fork/join
(csrc/include/fastllm/grain.h), so on an idle machine the default thread count should be at
least as fast as one thread on these shapes. Repetitions alternate between the thread counts,
so a change of machine load hits every count alike.

    train step : forward + backward of model.loss on (batch, seq) random tokens, then AdamW
    generate   : fastllm.generation.generate, `gen_batch` prompts of `prompt` tokens, `new`
                 sampled tokens each (temperature 1, top-k 20, top-p 0.9; no stop token)

Rows (one per case and thread count: median and 20th-80th percentile ms, the 1-minute load
average before and after) are appended to bench/results/threads.jsonl with the device,
versions, commit and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import environment, write_rows  # noqa: E402
from fastllm.generation import generate  # noqa: E402
from fastllm.labels import next_token_labels  # noqa: E402
from fastllm.models import build_model, preset  # noqa: E402
from fastllm.train.common import build_optimizer  # noqa: E402


def cases(args):
    torch.manual_seed(0)
    model = build_model(preset(args.config))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    labels = next_token_labels(ids)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0)

    def train_step():
        model.train()
        loss = model.loss(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gen_model = build_model(preset(args.config)).eval()
    prompts = torch.randint(0, vocab, (args.gen_batch, args.prompt))
    gen = torch.Generator().manual_seed(0)

    def generate_call():
        generate(gen_model, prompts, args.new, temperature=1.0, top_k=20, top_p=0.9, generator=gen)

    return {
        "train_step": (train_step, dict(batch=args.batch, seq=args.seq)),
        "generate": (generate_call, dict(batch=args.gen_batch, prompt=args.prompt, new=args.new)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-llama")
    p.add_argument("--threads", type=int, nargs="*", default=None, help="default: 1 and torch's default")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    device = torch.device("cpu")
    env = environment(device)
    load_before = os.getloadavg()[0]
    fns = cases(args)
    times = {(name, n): [] for name in fns for n in threads}
    for name, (fn, _) in fns.items():
        for n in threads:  # warm-up at every thread count
            torch.set_num_threads(n)
            fn()
            fn()
        for _ in range(args.reps):
            for n in threads:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                fn()
                times[(name, n)].append((time.perf_counter() - t0) * 1e3)
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()[0]

    rows = []
    print(f"{args.config}, default threads {default_threads}, load {load_before:.2f} -> {load_after:.2f}")
    print(f"{'case':<12} {'threads':>7} {'median ms':>10} {'p20-p80 ms':>16} {'x 1 thread':>10}")
    for name, (_, shape) in fns.items():
        base = statistics.median(times[(name, threads[0])])
        for n in threads:
            t = times[(name, n)]
            q = statistics.quantiles(t, n=5) if len(t) >= 2 else [t[0]] * 4
            med = statistics.median(t)
            print(f"{name:<12} {n:>7} {med:>10.2f} {q[0]:>7.2f}-{q[3]:<8.2f} {base / med:>10.2f}")
            rows.append(dict(bench="threads", case=name, config=args.config, threads=n,
                             default_threads=default_threads, median_ms=med, p20_ms=q[0], p80_ms=q[3],
                             reps=len(t), load_before=load_before, load_after=load_after, **shape, **env))
    if not args.no_write:
        write_rows("threads", rows)
    return rows


if __name__ == "__main__":
    main()
