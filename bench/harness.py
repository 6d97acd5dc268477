"""Shared benchmark harness: providers side by side in one run.

    from bench.harness import Case, run_cases
    run_cases("rms_norm", cases, providers, bytes_fn=..., flops_fn=...)

For each case and provider it reports the median time and its spread (20th-80th
percentile), throughput from an explicit formula (GB/s from bytes moved, TFLOP/s from
FLOPs), and peak memory above the inputs (CUDA: the caching allocator's peak; CPU: the
allocations recorded by torch.profiler). Every row is appended as one JSON line to
bench/results/<name>.jsonl with the device name, torch/triton versions, git commit, whether
the tree had uncommitted changes (`dirty`, bench/results/ itself not counted), the date, the
machine load when the run started (`load_avg`: 1/5/15-minute averages) and a `run_id` shared
by every row of one invocation (FASTLLM_BENCH_RUN_ID sets it, e.g. to group the benches of one
gpu_check.sh). Ratios between providers measured in one run are the figures we quote.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESULTS_DIR = os.environ.get("FASTLLM_BENCH_RESULTS", os.path.join(os.path.dirname(__file__), "results"))


@dataclass
class Case:
    """One benchmark point. `make()` builds fresh inputs (a dict of keyword args)."""

    name: str
    params: dict
    make: Callable[[], dict]


@dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mb: float
    reps: int
    extra: dict = field(default_factory=dict)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            max_seconds: float = 10.0) -> list[float]:
    """Wall times of `fn` in milliseconds, synchronised on CUDA; stops early past max_seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1,
                     reps: int = 5, max_seconds: float = 600.0) -> dict[str, list[float]]:
    """Wall times in milliseconds of several functions timed in turns: round r calls each once,
    in the given order on even rounds and reversed on odd ones. On a machine whose speed drifts
    over minutes (shared hosts, thermal limits), timing one function's reps after another's
    puts the drift into their ratio; in turns every provider sees the same moments. Stops early
    past max_seconds once every function has 3 times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            times[name].extend(time_ms(fns[name], device, warmup=0, reps=1, max_seconds=float("inf")))
        if time.perf_counter() - start_all > max_seconds and r + 1 >= 3:
            break
    return times


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated while `fn` runs, above what was allocated before, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(allocs):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def measure(fn: Callable[[], object], device: torch.device, **kw) -> Stats:
    times = time_ms(fn, device, **kw)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Stats(statistics.median(times), q[0], q[3], peak_memory_mb(fn, device), len(times))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str:
    return (_git("rev-parse", "--short", "HEAD") or "").strip() or "unknown"


def _git_dirty() -> bool | None:
    """True when the tree has uncommitted changes (untracked files included), not counting
    bench/results/ (which every run appends to); None outside a git checkout."""
    out = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return None if out is None else bool(out.strip())


@functools.cache
def _run() -> dict:
    """What every row of this invocation shares: one run id, the load and the date at start."""
    now = datetime.datetime.now(datetime.timezone.utc)
    run_id = os.environ.get("FASTLLM_BENCH_RUN_ID") or f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"run_id": run_id, "load_avg": load, "date": now.isoformat(timespec="seconds")}


def environment(device: torch.device) -> dict:
    """Fields every result row carries: device, versions, commit, dirty, date, load, run_id."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "dirty": _git_dirty(),
        **_run(),
    }


def run_cases(
    name: str,
    cases: list[Case],
    providers: dict[str, Callable[..., Callable[[], object]]],
    device: torch.device | str,
    *,
    bytes_fn: Callable[[dict], float] | None = None,
    flops_fn: Callable[[dict], float] | None = None,
    baseline: str | None = None,
    reps: int = 20,
    write: bool = True,
) -> list[dict]:
    """Benchmark every provider on every case; print the table; append JSON lines.

    providers: name -> factory(**inputs) returning the zero-argument callable to time
    (so set-up such as torch.compile happens outside the timed region). A factory may raise
    NotImplementedError to mark a provider unsupported for that case.
    bytes_fn / flops_fn: case params -> bytes moved / FLOPs, for GB/s and TFLOP/s.
    baseline: provider whose time and memory the ratio columns divide by.
    """
    device = torch.device(device)
    env = environment(device)
    rows = []
    print(f"\n## {name} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
          f"{' + uncommitted changes' if env['dirty'] else ''}, run {env['run_id']}, load {env['load_avg']})")
    header = (f"{'case':<28} {'provider':<16} {'median ms':>10} {'p20-p80 ms':>15} {'GB/s':>8} {'TFLOP/s':>8} "
              f"{'peak MiB':>9} {'x base':>7} {'mem/base':>8}")
    print(header)
    print("-" * len(header))
    for case in cases:
        results = {}
        for pname, factory in providers.items():
            inputs = case.make()
            try:
                fn = factory(**inputs)
                stats = measure(fn, device, reps=reps)
            except NotImplementedError as exc:
                print(f"{case.name:<28} {pname:<16} {'n/a: ' + str(exc)}")
                continue
            results[pname] = stats
            del fn, inputs
        base = results.get(baseline) if baseline else None
        for pname, s in results.items():
            gbs = bytes_fn(case.params) / (s.median_ms * 1e-3) / 1e9 if bytes_fn else None
            tfs = flops_fn(case.params) / (s.median_ms * 1e-3) / 1e12 if flops_fn else None
            speed = base.median_ms / s.median_ms if base else None
            mem = s.peak_mb / base.peak_mb if base and base.peak_mb > 0 else None
            print(f"{case.name:<28} {pname:<16} {s.median_ms:>10.3f} {f'{s.p20_ms:.3f}-{s.p80_ms:.3f}':>15} "
                  f"{_fmt(gbs):>8} {_fmt(tfs, 3):>8} {s.peak_mb:>9.1f} {_fmt(speed, 2):>7} {_fmt(mem, 2):>8}")
            rows.append({"bench": name, "case": case.name, **case.params, "provider": pname,
                         "median_ms": s.median_ms, "p20_ms": s.p20_ms, "p80_ms": s.p80_ms, "reps": s.reps,
                         "peak_mib": s.peak_mb, "gb_per_s": gbs, "tflop_per_s": tfs,
                         "speedup_vs_baseline": speed, "memory_vs_baseline": mem, "baseline": baseline, **env})
    if write:
        write_rows(name, rows)
    return rows


def write_rows(name: str, rows: list[dict]) -> None:
    """Append a run's rows to bench/results/<name>.jsonl, one JSON object per line (none: no-op)."""
    if not rows:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
