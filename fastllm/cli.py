"""The `fastllm` command: `fastllm pipeline [--quick]` (the main job), `fastllm demo`,
`fastllm pretrain|sft|dpo|reward|ppo|grpo|finetune [CONFIG.yaml] key=value ...`,
`fastllm plot metrics.jsonl`. Under `torchrun --nproc_per_node N -m fastllm.cli sft ...` the
loops run distributed (DDP, or FSDP2 with distributed=fsdp)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description="fastllm: fused kernels and training loops for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the fused ops on every available backend and print a table")
    demo.add_argument("--rows", type=int, default=2048)
    demo.add_argument("--hidden", type=int, default=2048)
    demo.add_argument("--device", default=None)
    from fastllm.train.config import CONFIGS, describe_fields

    commands = (("pretrain", "causal or masked LM pre-training"),
                ("sft", "supervised fine-tuning (full, layers, PEFT)"),
                ("dpo", "direct preference optimisation (DPO, IPO, conservative DPO)"),
                ("reward", "a reward model from preference pairs (Bradley-Terry)"),
                ("ppo", "PPO on the policy's own rollouts against a reward model / function"),
                ("grpo", "GRPO / RLOO: group-relative advantages over G samples per prompt, no critic"),
                ("finetune", "task heads: classification, regression, token classification (named entities)"))
    for name, what in commands:
        p = sub.add_parser(name, help=what, description=f"{what}. Options: a YAML config and/or key=value overrides "
                           "(values parsed as YAML: lr=1e-4, freeze=[a,b], peft.r=8).",
                           epilog=f"config fields (key, type, default: meaning):\n{describe_fields(CONFIGS[name])}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml|key=value")
    pipe = sub.add_parser("pipeline", help="the main job: every stage from the tokenizer to GRPO, with a report",
                          description="Train every stage on the shipped data, each feeding the next, and write "
                          "report.md, report.html and summary.json into the output folder. Run again on the same "
                          "folder to resume where it stopped.")
    pipe.add_argument("--output-dir", default="runs/pipeline", help="where runs, state and the report go")
    pipe.add_argument("--quick", action="store_true", help="small sizes, a few minutes on a CPU")
    pipe.add_argument("--stages", default=None, help="comma-separated stages to run (what they need runs first)")
    pipe.add_argument("--model", default=None, help="a Hugging Face checkpoint dir the fine-tuning stages start from")
    pipe.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    pipe.add_argument("--seed", type=int, default=0)
    plot = sub.add_parser("plot", help="turn a metrics.jsonl into a loss-curve PNG")
    plot.add_argument("metrics")
    plot.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command in ("pretrain", "sft", "dpo", "reward", "ppo", "grpo", "finetune"):
        return _train(args.command, args.args)
    if args.command == "pipeline":
        from fastllm.pipeline import PipelineOptions, run_pipeline

        stages = [n.strip() for n in args.stages.split(",") if n.strip()] if args.stages else None
        try:
            run_pipeline(PipelineOptions(output_dir=args.output_dir, quick=args.quick, stages=stages,
                                         model=args.model, device=args.device, seed=args.seed))
        except ValueError as exc:
            raise SystemExit(f"fastllm pipeline: {exc}") from None
        return 0
    if args.command == "plot":
        from fastllm.train.logging import plot_loss_curve

        print(plot_loss_curve(args.metrics, args.out))
        return 0
    if args.command == "demo":
        from fastllm import demo as demo_mod

        demo_mod.run(args.rows, args.hidden, args.device)
    return 0


def _train(command: str, items: list[str]) -> int:
    import json

    from fastllm import train

    files = [a for a in items if "=" not in a]
    if len(files) > 1:
        raise SystemExit(f"fastllm {command}: expected at most one CONFIG.yaml, got {files}")
    overrides = [a for a in items if "=" in a]
    cls = train.config.CONFIGS[command]
    try:
        config = train.load_config(cls, files[0] if files else None, overrides)
    except ValueError as exc:
        raise SystemExit(f"fastllm {command}: {exc}") from None
    try:
        result = getattr(train, command)(config)
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message says what to fix
        raise SystemExit(f"fastllm {command}: {exc}") from None
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
