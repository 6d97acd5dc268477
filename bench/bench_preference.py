"""Preference training side by side: fastllm's DPO and GRPO trainers against TRL's `DPOTrainer`
and `GRPOTrainer`, same model, data and batch shapes, in one run.

    python bench/bench_preference.py                       # a small Llama (hidden 512, 4 layers), 8 pairs/step
    python bench/bench_preference.py --config smollm2-135m --overrides '{}' --pairs 4 --steps 8
    python bench/bench_preference.py --methods grpo --prompts 4 --generations 4 --completion-length 64

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

GRPO case: --prompts prompts per step (the first ones of the same records, the generation prompt
as text), --generations G samples each, at most --completion-length new tokens, temperature 1,
the same Python reward function on both sides (`bench_reward`: spaces in the decoded completion
/ 10), beta 0.04 (a reference model on both sides), token_mean aggregation (TRL's "dapo"), group
std scaling, one pass per rollout (mu = 1), AdamW at a constant learning rate. One step = one
iteration, generation included (TRL generates inside its training step). tokens/s = prompts x
G x (mean prompt tokens + completion length) / median step time, the same work formula on both
sides; each side's mean sampled completion length is reported (an untrained model rarely stops,
so both sample close to the limit).
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
    models.save_pretrained(model, os.path.join(work, "model"))


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



def _trl_timer(times: list, logged: list):
    """A transformers TrainerCallback appending each step's wall time (ms) to `times` and each
    log record that has a loss to `logged`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(1e3 * (time.perf_counter() - self.t0))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logged.append(dict(logs))

    return Timer()

def run_trl(work: str, args) -> dict:
    import datasets
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(work, "model"))
    data = datasets.Dataset.from_list([{"prompt": r["prompt_text"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                       for r in _records(args.records)])
    base = _rss_mib()
    model = LlamaForCausalLM.from_pretrained(os.path.join(work, "model"), attn_implementation="sdpa",
                                             dtype=torch.float32)
    times, logged = [], []
    timer = _trl_timer(times, logged)

    cfg = DPOConfig(output_dir=os.path.join(work, f"trl_{args.reference}"), per_device_train_batch_size=args.pairs,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_length=args.max_length, beta=0.1, loss_type=["sigmoid"],
                    precompute_ref_log_probs=args.reference == "precomputed", report_to="none", use_cpu=True,
                    logging_steps=1, save_strategy="no", eval_strategy="no", bf16=False, fp16=False,
                    dataloader_num_workers=0, disable_tqdm=True, seed=1)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_ms": times[args.warmup:], "peak_mib": _peak_rss_mib() - base,
            "first_loss": logged[0]["loss"] if logged else None, "last_loss": logged[-1]["loss"] if logged else None}


def bench_reward(prompts, completions, **kw):
    """The GRPO case's reward on both sides: spaces in the decoded completion / 10."""
    return [c.count(" ") / 10.0 for c in completions]


def run_fastllm_grpo(work: str, args) -> dict:
    import torch

    import fastllm.peft  # noqa: F401  (imported before the baseline RSS, as TRL's side imports everything first)
    from fastllm.generation import generate  # noqa: F401
    from fastllm.ops import token_logprobs
    from fastllm.tokenizer import load_tokenizer
    from fastllm.train import grpo
    from fastllm.train.logging import read_metrics

    token_logprobs(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(2, dtype=torch.long))  # loads the extension
    tok = load_tokenizer(os.path.join(work, "model"))
    recs = [{"prompt": r["prompt"]} for r in _records(args.prompts)]
    base = _rss_mib()
    out = os.path.join(work, "fastllm_grpo")
    grpo(dict(model=os.path.join(work, "model"), output_dir=out, max_steps=args.warmup + args.steps,
              batch_size=args.prompts, num_generations=args.generations, max_new_tokens=args.completion_length,
              temperature=1.0, beta=0.04, loss_type="token_mean", advantage="grpo", scale_rewards=True,
              reward_inputs="text", lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0,
              max_prompt_length=args.max_length, progress=False, plot=False, resume=None, dtype="float32",
              device="cpu", seed=1), tokenizer=tok, prompts=recs, reward_funcs=[bench_reward])
    m = os.path.join(out, "metrics.jsonl")
    tokens, rate, loss = (read_metrics(m, k) for k in ("tokens", "tokens_per_s", "loss"))
    length, reward = read_metrics(m, "response_length"), read_metrics(m, "reward/mean")
    steps = [s for s in tokens if s > args.warmup]
    phases = {ph: statistics.median(1e3 * v for s, v in read_metrics(m, f"time/{ph}").items() if s in steps)
              for ph in ("rollout", "scoring", "training")}
    peak = _peak_rss_mib() - base
    return {"step_ms": [1e3 * tokens[s] / rate[s] for s in steps], "peak_mib": peak,
            "first_loss": loss[1], "last_loss": loss[max(loss)],
            "completion_length": statistics.mean(length[s] for s in steps),
            "reward": statistics.mean(reward[s] for s in steps), "phases_ms": phases,
            "floor_ms": grpo_floor_ms(work, args, recs, tok)}


def grpo_floor_ms(work: str, args, recs, tok) -> dict:
    """The iteration's work besides generation, on rows of its shape (prompts x G rows of the
    longest prompt + completion_length tokens): a reference forward (no gradient) and a policy
    forward + backward, each to the token log-probs, as any GRPO implementation with beta > 0
    must run them; median ms of 5 after one warm-up."""
    import time

    import torch

    from fastllm import models
    from fastllm.data import PromptDataset
    from fastllm.train.rollout import PolicyLogProbs

    model = models.from_pretrained(os.path.join(work, "model")).eval()
    lp = PolicyLogProbs(model)
    prompts = PromptDataset(recs, tok, args.max_length, skip_too_long=True).examples
    B, L = args.prompts * args.generations, max(len(p) for p in prompts) + args.completion_length
    ids = torch.randint(3, model.config.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    targets = torch.roll(ids, -1, 1)

    def reference():
        with torch.no_grad():
            lp(ids, mask, targets)

    def policy():
        logp, _ = lp(ids, mask, targets)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("reference_forward", reference), ("policy_forward_backward", policy)):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = statistics.median(times)
    return out


def run_trl_grpo(work: str, args) -> dict:
    import datasets
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(work, "model"))
    data = datasets.Dataset.from_list([{"prompt": r["prompt_text"]} for r in _records(args.prompts)])
    base = _rss_mib()
    model = LlamaForCausalLM.from_pretrained(os.path.join(work, "model"), attn_implementation="sdpa",
                                             dtype=torch.float32)
    times, logged = [], []
    timer = _trl_timer(times, logged)

    n = args.prompts * args.generations
    cfg = GRPOConfig(output_dir=os.path.join(work, "trl_grpo"), per_device_train_batch_size=n,
                     num_generations=args.generations, max_completion_length=args.completion_length,
                     temperature=1.0, beta=0.04, loss_type="dapo", scale_rewards="group", num_iterations=1,
                     max_steps=args.warmup + args.steps, learning_rate=1e-6, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, report_to="none", use_cpu=True, logging_steps=1,
                     save_strategy="no", eval_strategy="no", bf16=False, fp16=False, dataloader_num_workers=0,
                     disable_tqdm=True, seed=1, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[bench_reward], args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    timed = logged[args.warmup:] or logged
    return {"step_ms": times[args.warmup:], "peak_mib": _peak_rss_mib() - base,
            "first_loss": logged[0]["loss"] if logged else None, "last_loss": logged[-1]["loss"] if logged else None,
            "completion_length": statistics.mean(r.get("completions/mean_length", float("nan")) for r in timed),
            "reward": statistics.mean(r.get("reward", float("nan")) for r in timed)}


def grpo_step_tokens(work: str, args) -> float:
    """prompts x G x (mean prompt tokens + completion length), fastllm's tokenisation of the prompts."""
    from fastllm.data import PromptDataset
    from fastllm.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(work, "model"))
    data = PromptDataset([{"prompt": r["prompt"]} for r in _records(args.prompts)], tok, args.max_length,
                         skip_too_long=True)
    mean_prompt = sum(len(p) for p in data.examples) / len(data.examples)
    return args.prompts * args.generations * (mean_prompt + args.completion_length)


def mean_step_tokens(work: str, args) -> float:
    """Real tokens per step (both sides of --pairs pairs, prompt included), fastllm's tokenisation."""
    from fastllm.data import PreferenceDataset
    from fastllm.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(work, "model"))
    recs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _records(args.records)]
    data = PreferenceDataset(recs, tok, args.max_length, too_long="truncate")
    per_pair = [len(ex["chosen"]["input_ids"]) + len(ex["rejected"]["input_ids"]) for ex in data.examples]
    return args.pairs * sum(per_pair) / len(per_pair)


def _providers(work: str, args, have_trl: bool, method: str, extra: list[str]) -> dict:
    """Each provider of one case in its own subprocess -> {provider: result}."""
    results = {}
    for provider in ["fastllm"] + (["trl"] if have_trl else []):
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", provider, "--_method", method, "--_work", work,
               "--records", str(args.records), "--pairs", str(args.pairs), "--max-length", str(args.max_length),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--prompts", str(args.prompts), "--generations", str(args.generations), "--completion-length",
               str(args.completion_length), *extra]
        envv = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=envv)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{method:<12} {provider:<8} failed: {(proc.stdout + proc.stderr)[-1500:]}")
            continue
        results[provider] = json.loads(lines[-1][len("RESULT "):])
    return results


def _table_rows(results: dict, label: str, step_tokens: float, common: dict) -> list[dict]:
    """Print one case's rows (speed and memory relative to TRL) and return them as records."""
    base = results.get("trl")
    rows = []
    for provider, r in results.items():
        med = statistics.median(r["step_ms"])
        q = statistics.quantiles(r["step_ms"], n=5) if len(r["step_ms"]) >= 2 else [med] * 4
        speed = statistics.median(base["step_ms"]) / med if base else None
        mem = r["peak_mib"] / base["peak_mib"] if base else None
        losses = f"{r['first_loss']:.4f}->{r['last_loss']:.4f}" if r["first_loss"] is not None else "-"
        extra = f" completion {r['completion_length']:.1f}" if "completion_length" in r else ""
        print(f"{label:<12} {provider:<8} {med:>10.1f} {f'{q[0]:.1f}-{q[3]:.1f}':>15} "
              f"{step_tokens / med * 1e3:>9.0f} {r['peak_mib']:>9.1f} "
              f"{'-' if speed is None else f'{speed:.2f}':>9} {'-' if mem is None else f'{mem:.2f}':>8} "
              f"{losses:>16}{extra}")
        rows.append({**common, "provider": provider, "tokens_per_step": step_tokens, "median_ms": med,
                     "p20_ms": q[0], "p80_ms": q[3], "reps": len(r["step_ms"]),
                     "tokens_per_s": step_tokens / med * 1e3, "peak_mib": r["peak_mib"],
                     "first_loss": r["first_loss"], "last_loss": r["last_loss"],
                     **{k: r[k] for k in ("completion_length", "reward", "phases_ms", "floor_ms") if k in r},
                     "speedup_vs_baseline": speed, "memory_vs_baseline": mem, "baseline": "trl" if base else None})
    return rows


def _case_header(title: str, step_tokens: float, args, env: dict, header: str) -> None:
    """Print one case's title line (with the machine, commit and load average, which it records
    in env) and the table header."""
    env["load_average"] = os.getloadavg()
    print(f"\n## {title}, ~{step_tokens:.0f} tokens/step, float32, {args.threads} thread(s), {env['device']}, "
          f"commit {env['commit']}, load average {env['load_average'][0]:.2f}")
    print(header + "\n" + "-" * len(header))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-llama")
    p.add_argument("--overrides", type=json.loads, default={"hidden_size": 512, "intermediate_size": 1376,
                                                             "num_hidden_layers": 4, "num_attention_heads": 8,
                                                             "num_key_value_heads": 4},
                   help="preset fields to replace, as JSON")
    p.add_argument("--methods", nargs="*", default=["dpo", "grpo"], choices=["dpo", "grpo"])
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4, help="GRPO: prompts per step")
    p.add_argument("--generations", type=int, default=4, help="GRPO: samples per prompt (G)")
    p.add_argument("--completion-length", type=int, default=64, help="GRPO: max new tokens per sample")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--references", nargs="*", default=["live", "precomputed"], choices=["live", "precomputed"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--_worker", choices=["fastllm", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--_method", default="dpo", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--reference", default="live", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:  # one provider, in its own process
        import torch

        torch.set_num_threads(args.threads)
        run = {("dpo", "fastllm"): run_fastllm, ("dpo", "trl"): run_trl, ("grpo", "fastllm"): run_fastllm_grpo,
               ("grpo", "trl"): run_trl_grpo}[(args._method, args._worker)]
        print("RESULT " + json.dumps(run(args._work, args)))
        return

    from bench.harness import environment, write_rows

    try:
        import trl
        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed (pip install -r requirements/bench.txt): TRL's DPOTrainer and GRPOTrainer are "
              "skipped")
    rows = []
    header = (f"{'case':<12} {'provider':<8} {'median ms':>10} {'p20-p80 ms':>15} {'tokens/s':>9} "
              f"{'peak MiB':>9} {'speed/TRL':>9} {'mem/TRL':>8} {'loss 1st->last':>16}")
    with tempfile.TemporaryDirectory() as work:
        prepare(work, args.config, args.overrides, args.records, args.vocab)
        env = environment(__import__("torch").device("cpu"))
        env["threads"] = args.threads
        env["trl"] = getattr(trl, "__version__", None) if have_trl else None
        model = {"config": args.config, "overrides": args.overrides}
        if "dpo" in args.methods:
            step_tokens = mean_step_tokens(work, args)
            _case_header(f"DPO step, {args.config} {json.dumps(args.overrides)}, {args.pairs} pairs/step, "
                         f"max_length {args.max_length}", step_tokens, args, env, header)
            for reference in args.references:
                results = _providers(work, args, have_trl, "dpo", ["--reference", reference])
                rows += _table_rows(results, reference, step_tokens, {
                    "bench": "preference", "case": f"dpo {args.config} p{args.pairs} {reference}", "method": "dpo",
                    **model, "reference": reference, "pairs": args.pairs, "max_length": args.max_length, **env})
        if "grpo" in args.methods:
            step_tokens = grpo_step_tokens(work, args)
            _case_header(f"GRPO iteration (generation included), {args.config} {json.dumps(args.overrides)}, "
                         f"{args.prompts} prompts x G={args.generations}, completions <= {args.completion_length} "
                         "tokens, beta 0.04", step_tokens, args, env, header)
            results = _providers(work, args, have_trl, "grpo", [])
            ours, trl_r = results.get("fastllm"), results.get("trl")
            if ours:
                ph, fl = ours["phases_ms"], ours["floor_ms"]
                floor = fl["reference_forward"] + fl["policy_forward_backward"]
                print(f"fastllm phases, median ms: rollout {ph['rollout']:.0f}, scoring (reward + reference) "
                      f"{ph['scoring']:.0f}, training {ph['training']:.0f}; without generation an iteration needs "
                      f"at least a reference forward ({fl['reference_forward']:.0f}) and a policy forward + "
                      f"backward ({fl['policy_forward_backward']:.0f}) = {floor:.0f} ms"
                      + (f", against 2x TRL's iteration = {statistics.median(trl_r['step_ms']) / 2:.0f} ms"
                         if trl_r else ""))
            rows += _table_rows(results, "grpo", step_tokens, {
                "bench": "preference", "case": f"grpo {args.config} p{args.prompts} g{args.generations} "
                f"c{args.completion_length}", "method": "grpo", **model, "prompts": args.prompts,
                "generations": args.generations, "completion_length_max": args.completion_length, **env})
            env["load_average_after"] = os.getloadavg()
            print(f"load average after: {env['load_average_after'][0]:.2f}")
    if not args.no_write:
        write_rows("preference", rows)


if __name__ == "__main__":
    main()
