"""`run_pipeline`: the stages in order, each feeding the next, with stage-level resume.

output folder:
    state.json            finished stages: their summary rows, artefact paths, finish times
    <stage>/              each stage's run (checkpoints, metrics.jsonl, loss_curve.png, final/)
    report.md, report.html, summary.json
A run started again on the same folder skips the stages state.json lists as finished and
resumes an unfinished one from its trainer's last checkpoint (its output_dir is the same).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .stages import SIZES, STAGES

STATE_FILE = "state.json"
MEMORY_NOTE = {"cpu": "the process's peak resident set size during the stage (sampled every 10 ms from "
                      "/proc/self/statm) minus its size when the stage started",
               "cuda": "torch.cuda.max_memory_allocated during the stage"}


@dataclass
class PipelineOptions:
    output_dir: str = "runs/pipeline"
    quick: bool = False  # the small sizes of the end-to-end test (a few minutes on one CPU thread)
    stages: list | None = None  # names to run (the stages they need run first); None: all
    model: str | None = None  # a Hugging Face checkpoint dir the fine-tuning stages start from
    device: str = "auto"
    seed: int = 0
    progress: bool = True  # the trainers' progress bars


@dataclass
class Context:
    """What a stage sees: where to write, the sizes, the device, and what earlier stages made."""

    out: Path
    sizes: dict
    device: str
    torch_device: torch.device
    seed: int
    progress: bool
    model_dir: str | None = None
    artefacts: dict = field(default_factory=dict)  # stage name -> its artefacts


class _Measure:
    wall_s: float = 0.0
    peak_mb: float = 0.0


@contextlib.contextmanager
def measure(device: torch.device):
    """Wall time and peak memory of the block (see MEMORY_NOTE for what peak memory means)."""
    m = _Measure()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _RSSSampler()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            m.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            m.peak_mb = sampler.stop()
        m.wall_s = time.perf_counter() - t0
        sampler.stop()


class _RSSSampler:
    """Peak resident set size above the starting one, sampled by a daemon thread (Linux); off
    Linux, the growth of getrusage's peak RSS."""

    def __init__(self, every_s: float = 0.01):
        self.start = self.peak = _rss_mb()
        self.rusage0 = _max_rss_mb()
        self.done = threading.Event()
        self.thread = None
        if self.start is not None:
            self.thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
            self.thread.start()

    def _run(self, every_s: float) -> None:
        while not self.done.wait(every_s):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        if self.thread is None:
            return _max_rss_mb() - self.rusage0
        self.done.set()
        self.thread.join()
        return max(self.peak, _rss_mb()) - self.start


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def plan(names: list[str] | None, done: set[str], model_dir: str | None) -> list[str]:
    """The stages to run, in pipeline order: those named (all when None), plus what they need
    that is not finished yet. With --model the fine-tuning stages need no pre-training."""
    known = [s.name for s in STAGES]
    if names is None:
        wanted = set(known)
    else:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; stages are {', '.join(known)}")
        wanted = set(names)
    by_name = {s.name: s for s in STAGES}
    stack = list(wanted)
    while stack:
        for need in by_name[stack.pop()].needs:
            if model_dir is not None and need == "pretrain":
                continue
            if need not in wanted and need not in done:
                wanted.add(need)
                stack.append(need)
    return [n for n in known if n in wanted]


def _settings(opts: PipelineOptions, sizes: dict) -> dict:
    return {"quick": opts.quick, "model": opts.model, "seed": opts.seed, "sizes": sizes}


def _load_state(out: Path, settings: dict) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"settings": settings, "stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"output_dir: {path} is not valid JSON ({exc}); delete it to start over") from None
    if state.get("settings") != settings:
        raise ValueError(f"output_dir: {out} holds a pipeline run with other settings "
                         f"({json.dumps(state.get('settings'))[:300]}), expected {json.dumps(settings)[:300]}; "
                         "use another --output-dir or delete that folder")
    return state


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATE_FILE)


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run_pipeline(opts: PipelineOptions | None = None, **kwargs) -> dict:
    """Run the pipeline (PipelineOptions, or its fields as keywords); returns the summary
    (also written to summary.json) with one row per finished stage."""
    from fastllm.train.common import resolve_device

    from .report import write_report

    opts = opts or PipelineOptions(**kwargs)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["quick" if opts.quick else "default"]
    settings = _settings(opts, sizes)
    state = _load_state(out, settings)
    done = set(state["stages"])
    todo = plan(opts.stages, done, opts.model)
    device = resolve_device(opts.device)
    ctx = Context(out=out, sizes=sizes, device=str(device), torch_device=device, seed=opts.seed,
                  progress=opts.progress, model_dir=opts.model,
                  artefacts={k: v["artefacts"] for k, v in state["stages"].items()})
    by_name = {s.name: s for s in STAGES}
    t_start = time.perf_counter()
    for i, name in enumerate(todo, 1):
        stage = by_name[name]
        head = f"[{i}/{len(todo)}] {name}: {stage.what}"
        if name in done:
            _say(f"{head} - done in an earlier run, skipped")
            continue
        _say(f"{head} ... (elapsed {time.perf_counter() - t_start:.0f} s)")
        torch.manual_seed(opts.seed)
        with measure(device) as m:
            result = stage.run(ctx)
        row = {"stage": name, **result.row, "wall_s": m.wall_s, "peak_mem_mb": m.peak_mb}
        state["stages"][name] = {"row": row, "artefacts": result.artefacts, "extra": result.extra,
                                 "finished_at": time.time()}
        ctx.artefacts[name] = result.artefacts
        _save_state(out, state)
        scores = "; ".join(f"{r.get('head', name)} {r['metric']}: {r['before_text']} -> {r['after_text']}"
                           for r in row.get("rows") or [row])
        _say(f"{head} - {scores} in {m.wall_s:.1f} s")
    summary = {"settings": settings, "device": str(device), "memory": MEMORY_NOTE.get(device.type, ""),
               "wall_s": time.perf_counter() - t_start,
               "stages": [state["stages"][s.name]["row"] for s in STAGES if s.name in state["stages"]],
               "artefacts": {k: v["artefacts"] for k, v in state["stages"].items()},
               "extra": {k: v["extra"] for k, v in state["stages"].items() if v.get("extra")}}
    paths = write_report(out, summary)
    from .report import format_table

    print(format_table(summary["stages"]))
    print(f"report: {paths['report.md']}")
    return summary


__all__ = ["PipelineOptions", "run_pipeline", "plan", "measure"]
