"""Preference training side by side: fastllm's DPO trainer against TRL's `DPOTrainer`, same
model, data and batch shapes, in one run.

    python bench/bench_preference.py                       # a small Llama (hidden 512, 4 layers), 8 pairs/step
    python bench/bench_preference.py --config smollm2-135m --overrides '{}' --pairs 4 --steps 8

Setup shared by both: one byte-level BPE tokenizer trained on the preference texts (saved as
tokenizer.json, loaded by fastllm and by transformers), one model built from the fastllm preset
and saved in the Hugging Face layout (fastllm loads it with `from_pretrained`, TRL with
transformers' LlamaForCausalLM, SDPA attention), the same `--records` pairs of the shipped
preference set rendered with the same chat template (prompt = the generation prompt,
responses + eos), float32, AdamW at a constant learning rate, beta 0.1, sigmoid loss, one
micro-batch of --pairs pairs per step. Reference: "live" (a frozen copy of the initial model
run every step, TRL's default) and "precomputed" (log-probs computed once before training;
TRL's precompute_ref_log_probs=True).

Each provider runs in its own subprocess (so peak memory is its own): step time is the median
over the steps after --warmup (fastllm: from its metrics, tokens / tokens_per_s; TRL: a
callback timing on_step_begin -> on_step_end); tokens/s = the mean real tokens of a step
(chosen + rejected, prompt included, no padding; from fastllm's tokenisation of the same
pairs) / median step time, so both sides are divided by the same work; peak memory = peak RSS
of the process minus its RSS after imports, tokenizer and data (model, reference, optimizer
state, activations). Rows are appended to bench/results/preference.jsonl. TRL is an optional
bench dependency (requirements/bench.txt): without it that provider is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _records(n: int):
    from fastllm.data import load_preferences
    from fastllm.tokenizer import format_prompt

    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
             "prompt_text": format_prompt(r["prompt"])} for r in load_preferences()[:n]]


def prepare(work: str, config: str, overrides: dict, n_records: int, vocab: int) -> None:
    """Tokenizer (tokenizer.json) and model (HF layout) under work/."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastllm import models

    recs = _records(n_records)
    texts = [r["prompt_text"] + r[side] for r in recs for side in ("chosen", "rejected")]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf_tok.save_pretrained(os.path.join(work, "model"))
    import torch

    torch.manual_seed(0)
    overrides = {"max_position_embeddings": 1024, **overrides, "vocab_size": len(hf_tok)}
    model = models.build_model(models.preset(config, **overrides))
    model.save_pretrained(os.path.join(work, "model"))


def run_fastllm(work: str, args) -> dict:
    import torch

    import fastllm.peft  # noqa: F401  (imported before the baseline RSS, as TRL's side imports everything first)
    from fastllm.ops import token_logprobs
    from fastllm.tokenizer import load_tokenizer
    from fastllm.train import dpo
    from fastllm.train.logging import read_metrics

    token_logprobs(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(2, dtype=torch.long))  # loads the extension

    tok = load_tokenizer(os.path.join(work, "model"))
    recs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _records(args.records)]
    base = _rss_mib()
    out = os.path.join(work, f"fastllm_{args.reference}")
    dpo(dict(model=os.path.join(work, "model"), output_dir=out, max_steps=args.warmup + args.steps,
             batch_size=args.pairs, lr=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0,
             max_length=args.max_length, too_long="truncate", beta=0.1, reference=args.reference, eval_batches=0,
             progress=False, plot=False, resume=None, dtype="float32", device="cpu"), tokenizer=tok, records=recs)
    tokens = read_metrics(os.path.join(out, "metrics.jsonl"), "tokens")
    rate = read_metrics(os.path.join(out, "metrics.jsonl"), "tokens_per_s")
    loss = read_metrics(os.path.join(out, "metrics.jsonl"), "loss")
    steps = [s for s in tokens if s > args.warmup]
    return {"step_ms": [1e3 * tokens[s] / rate[s] for s in steps], "peak_mib": _peak_rss_mib() - base,
            "first_loss": loss[1], "last_loss": loss[max(loss)]}


def run_trl(work: str, args) -> dict:
    import datasets
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(work, "model"))
    data = datasets.Dataset.from_list([{"prompt": r["prompt_text"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                       for r in _records(args.records)])
    base = _rss_mib()
    model = LlamaForCausalLM.from_pretrained(os.path.join(work, "model"), attn_implementation="sdpa",
                                             dtype=torch.float32)
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(1e3 * (time.perf_counter() - self.t0))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    cfg = DPOConfig(output_dir=os.path.join(work, f"trl_{args.reference}"), per_device_train_batch_size=args.pairs,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_length=args.max_length, beta=0.1, loss_type=["sigmoid"],
                    precompute_ref_log_probs=args.reference == "precomputed", report_to="none", use_cpu=True,
                    logging_steps=1, save_strategy="no", eval_strategy="no", bf16=False, fp16=False,
                    dataloader_num_workers=0, disable_tqdm=True, seed=1)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return {"step_ms": times[args.warmup:], "peak_mib": _peak_rss_mib() - base,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def mean_step_tokens(work: str, args) -> float:
    """Real tokens per step (both sides of --pairs pairs, prompt included), fastllm's tokenisation."""
    from fastllm.data import PreferenceDataset
    from fastllm.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(work, "model"))
    recs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _records(args.records)]
    data = PreferenceDataset(recs, tok, args.max_length, too_long="truncate")
    per_pair = [len(ex["chosen"]["input_ids"]) + len(ex["rejected"]["input_ids"]) for ex in data.examples]
    return args.pairs * sum(per_pair) / len(per_pair)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-llama")
    p.add_argument("--overrides", type=json.loads, default={"hidden_size": 512, "intermediate_size": 1376,
                                                             "num_hidden_layers": 4, "num_attention_heads": 8,
                                                             "num_key_value_heads": 4},
                   help="preset fields to replace, as JSON")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--references", nargs="*", default=["live", "precomputed"], choices=["live", "precomputed"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--_worker", choices=["fastllm", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--reference", default="live", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:  # one provider, in its own process
        import torch

        torch.set_num_threads(args.threads)
        res = (run_fastllm if args._worker == "fastllm" else run_trl)(args._work, args)
        print("RESULT " + json.dumps(res))
        return

    from bench.harness import RESULTS_DIR, environment

    try:
        import trl
        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed (pip install -r requirements/bench.txt): TRL's DPOTrainer is skipped")
    with tempfile.TemporaryDirectory() as work:
        prepare(work, args.config, args.overrides, args.records, args.vocab)
        step_tokens = mean_step_tokens(work, args)
        env = environment(__import__("torch").device("cpu"))
        env["threads"] = args.threads
        env["load_average"] = os.getloadavg()
        print(f"\n## DPO step, {args.config} {json.dumps(args.overrides)}, {args.pairs} pairs/step, "
              f"max_length {args.max_length}, "
              f"~{step_tokens:.0f} tokens/step, float32, {args.threads} thread(s), {env['device']}, "
              f"commit {env['commit']}, load average {env['load_average'][0]:.2f}")
        header = (f"{'reference':<12} {'provider':<8} {'median ms':>10} {'p20-p80 ms':>15} {'tokens/s':>9} "
                  f"{'peak MiB':>9} {'speed/TRL':>9} {'mem/TRL':>8} {'loss 1st->last':>16}")
        print(header + "\n" + "-" * len(header))
        rows = []
        for reference in args.references:
            results = {}
            for provider in ["fastllm"] + (["trl"] if have_trl else []):
                cmd = [sys.executable, os.path.abspath(__file__), "--_worker", provider, "--_work", work,
                       "--reference", reference, "--records", str(args.records), "--pairs", str(args.pairs),
                       "--max-length", str(args.max_length), "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--threads", str(args.threads)]
                envv = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
                proc = subprocess.run(cmd, capture_output=True, text=True, env=envv)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(f"{reference:<12} {provider:<8} failed: {(proc.stdout + proc.stderr)[-1500:]}")
                    continue
                results[provider] = json.loads(lines[-1][len("RESULT "):])
            base = results.get("trl")
            for provider, r in results.items():
                med = statistics.median(r["step_ms"])
                q = statistics.quantiles(r["step_ms"], n=5) if len(r["step_ms"]) >= 2 else [med] * 4
                speed = statistics.median(base["step_ms"]) / med if base else None
                mem = r["peak_mib"] / base["peak_mib"] if base else None
                losses = f"{r['first_loss']:.4f}->{r['last_loss']:.4f}" if r["first_loss"] is not None else "-"
                print(f"{reference:<12} {provider:<8} {med:>10.1f} {f'{q[0]:.1f}-{q[3]:.1f}':>15} "
                      f"{step_tokens / med * 1e3:>9.0f} {r['peak_mib']:>9.1f} "
                      f"{'-' if speed is None else f'{speed:.2f}':>9} {'-' if mem is None else f'{mem:.2f}':>8} "
                      f"{losses:>16}")
                rows.append({"bench": "preference", "case": f"dpo {args.config} p{args.pairs} {reference}",
                             "method": "dpo", "config": args.config, "overrides": args.overrides,
                             "reference": reference, "provider": provider,
                             "pairs": args.pairs, "max_length": args.max_length, "tokens_per_step": step_tokens,
                             "median_ms": med, "p20_ms": q[0], "p80_ms": q[3], "reps": len(r["step_ms"]),
                             "tokens_per_s": step_tokens / med * 1e3, "peak_mib": r["peak_mib"],
                             "first_loss": r["first_loss"], "last_loss": r["last_loss"],
                             "speedup_vs_baseline": speed, "memory_vs_baseline": mem,
                             "baseline": "trl" if base else None,
                             "trl": getattr(trl, "__version__", None) if have_trl else None, **env})
    if rows and not args.no_write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, "preference.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
