"""Print whole runs from bench result files (JSON lines): every provider of every case of one
run, so the ratios quoted come from one invocation.

    python bench/summarize.py bench/results/*.jsonl              # the newest run of each bench
    python bench/summarize.py bench/results/*.jsonl --run ID     # one run, by run_id
    python bench/summarize.py bench/results/*.jsonl --list       # every run: id, commit, date, rows

Rows written before run_id existed are grouped by (commit, date), which one invocation shared.
"""

from __future__ import annotations

import argparse
import json


def run_key(row: dict) -> str:
    return row.get("run_id") or f"{row.get('commit', '?')}@{row.get('date', '?')}"


def load_rows(files) -> list[dict]:
    rows = []
    for path in files:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def runs(rows: list[dict]) -> dict:
    """{(bench, run key): rows}, in file order."""
    out: dict = {}
    for r in rows:
        out.setdefault((r.get("bench", "?"), run_key(r)), []).append(r)
    return out


def newest_runs(rows: list[dict]) -> dict:
    """The last run appended for each bench."""
    last: dict = {}
    for (bench, key), rs in runs(rows).items():
        last[bench] = (key, rs)
    return {(bench, key): rs for bench, (key, rs) in last.items()}


def print_run(bench: str, key: str, rows: list[dict]) -> None:
    first = rows[0]
    dirty = first.get("dirty")
    state = "unknown" if dirty is None else ("uncommitted changes" if dirty else "clean")
    print(f"\n## {bench}  run {key}")
    print(f"device: {first.get('device')}  torch {first.get('torch')}  triton {first.get('triton')}  "
          f"commit {first.get('commit')} ({state})  date {first.get('date')}  load {first.get('load_avg', '-')}")
    print(f"{'case':<34} {'provider':<16} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>7} {'tokens/s':>9} "
          f"{'x base':>7} {'mem/base':>8}  base / losses")
    for r in rows:
        ms = r.get("median_ms", r["median_s"] * 1e3 if r.get("median_s") is not None else None)
        losses = r.get("losses")
        tail = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else (r.get("baseline") or "-")
        print(f"{r.get('case', '?')[:34]:<34} {r.get('provider', '?'):<16} {_num(ms, 3):>10} "
              f"{_fmt(r, 'tflop_per_s', 1):>8} {_fmt(r, 'gb_per_s', 0):>7} {_fmt(r, 'tokens_per_s', 0):>9} "
              f"{_fmt(r, 'speedup_vs_baseline', 2):>7} {_fmt(r, 'memory_vs_baseline', 2):>8}  {tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--run", default=None, help="print this run (run_id, or commit@date for old rows)")
    p.add_argument("--commit", default=None, help="only runs measured at this commit")
    p.add_argument("--list", action="store_true", help="list every run instead of printing tables")
    args = p.parse_args(argv)
    rows = load_rows(args.files)
    if args.commit:
        rows = [r for r in rows if r.get("commit") == args.commit]
    if args.list:
        for (bench, key), rs in runs(rows).items():
            print(f"{bench:<22} {key:<40} commit {rs[0].get('commit')} dirty {rs[0].get('dirty', '-')} "
                  f"{rs[0].get('date')}  {len(rs)} rows")
        return
    chosen = ({k: v for k, v in runs(rows).items() if k[1] == args.run} if args.run else newest_runs(rows))
    if not chosen:
        print(f"no rows for run {args.run}" if args.run else "no rows")
        return
    for (bench, key), rs in chosen.items():
        print_run(bench, key, rs)


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt(row: dict, key: str, digits: int) -> str:
    return _num(row.get(key), digits)


if __name__ == "__main__":
    main()
