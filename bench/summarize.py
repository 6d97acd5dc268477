"""Print a short table of the fastllm rows in bench result files (JSON lines).

    python bench/summarize.py bench/results/*.jsonl [--commit abc1234]
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--commit", default=None, help="only rows measured at this commit")
    args = p.parse_args(argv)
    rows = []
    for path in args.files:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if args.commit:
        rows = [r for r in rows if r.get("commit") == args.commit]
    rows = [r for r in rows if str(r.get("provider", "")).startswith("fastllm")]
    if not rows:
        print("no fastllm rows")
        return
    print(f"device: {rows[-1]['device']}  torch {rows[-1]['torch']}  triton {rows[-1]['triton']}  commit {rows[-1]['commit']}")
    print(f"{'bench':<16} {'case':<34} {'provider':<16} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'x base':>7} {'mem/base':>8}  base")
    for r in rows:
        def f(key, d):
            v = r.get(key)
            return "-" if v is None else f"{v:.{d}f}"
        print(f"{r['bench']:<16} {r['case'][:34]:<34} {r['provider']:<16} {r['median_ms']:>9.3f} {f('tflop_per_s', 1):>8} "
              f"{f('gb_per_s', 0):>7} {f('speedup_vs_baseline', 2):>7} {f('memory_vs_baseline', 2):>8}  {r.get('baseline') or '-'}")


if __name__ == "__main__":
    main()
