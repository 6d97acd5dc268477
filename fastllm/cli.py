"""The `fastllm` command: `fastllm demo`."""

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastllm import demo as demo_mod

        demo_mod.run(args.rows, args.hidden, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
