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
    last = rows[-1]
    print(f"device: {last['device']}  torch {last['torch']}  triton {last['triton']}  commit {last['commit']}")
    print(f"{'bench':<16} {'case':<34} {'provider':<16} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} "
          f"{'x base':>7} {'mem/base':>8}  base")
    for r in rows:
        tf, gb = _fmt(r, "tflop_per_s", 1), _fmt(r, "gb_per_s", 0)
        speed, mem = _fmt(r, "speedup_vs_baseline", 2), _fmt(r, "memory_vs_baseline", 2)
        print(f"{r['bench']:<16} {r['case'][:34]:<34} {r['provider']:<16} {r['median_ms']:>9.3f} {tf:>8} "
              f"{gb:>7} {speed:>7} {mem:>8}  {r.get('baseline') or '-'}")


def _fmt(row: dict, key: str, digits: int) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
