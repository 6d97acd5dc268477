"""Metrics as JSON lines, a one-line progress bar (loss, tokens/s, ETA) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per call to output_dir/metrics.jsonl (rank 0 only; other ranks
    write nothing). A resumed run appends to the same file, so a step may appear twice; the
    last record of a step is the one that counts (see `read_metrics`).

    When the optional `tensorboard` package is installed (`pip install fastllm[tensorboard]`),
    every numeric value of a record with a "step" is also written as a TensorBoard scalar
    (`torch.utils.tensorboard.SummaryWriter`, event files in output_dir/tensorboard); without
    it that is skipped silently. tensorboard=False turns it off."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.writer = _summary_writer(self.path.parent / "tensorboard")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, int(record["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _summary_writer(log_dir: Path):
    """A SummaryWriter into log_dir, or None when tensorboard is not installed."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(path: str | os.PathLike, key: str = "loss") -> dict[int, float]:
    """{step: value} of `key` from a metrics.jsonl (the last record of each step wins)."""
    out: dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if key in rec and "step" in rec:
                out[int(rec["step"])] = rec[key]
    return dict(sorted(out.items()))


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """`step 12/100 [###.......] loss 3.2104 | 10.5k tok/s | ETA 01:23` on one stderr line."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, width: int = 20, stream=None):
        self.total, self.start, self.enabled, self.width = total, start, enabled, width
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        tok_s = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done > 0 else float("inf")
        fill = int(self.width * step / max(1, self.total))
        bar = "#" * fill + "." * (self.width - fill)
        rate = f"{tok_s / 1000:.1f}k" if tok_s >= 1000 else f"{tok_s:.0f}"
        self.stream.write(f"\rstep {step}/{self.total} [{bar}] loss {loss:.4f} | {rate} tok/s | "
                          f"ETA {_fmt_time(eta)}  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or an ImportError saying `what` needs it and how to
    install it (every plot of the loops goes through here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"{what} needs matplotlib: pip install fastllm[plot] (or pip install matplotlib)") from exc
    return plt


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Plot training loss (and eval loss where logged) against step into a PNG (needs matplotlib)."""
    plt = pyplot("plot_loss_curve")
    metrics_path = Path(metrics_path)
    png_path = Path(png_path) if png_path else metrics_path.with_name("loss_curve.png")
    train = read_metrics(metrics_path, "loss")
    evals = read_metrics(metrics_path, "eval_loss")
    if not train and not evals:
        raise ValueError(f"metrics_path: {str(metrics_path)!r} holds no loss records")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(list(train), list(train.values()), label="train loss", linewidth=1)
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def write_loss_curve(metrics_path: str | os.PathLike) -> Path | None:
    """`plot_loss_curve` at the end of a run (plot=True): the PNG's path, or None and a warning
    saying the plot was skipped and how to install matplotlib when it is missing."""
    try:
        return plot_loss_curve(metrics_path)
    except ImportError as exc:
        png = Path(metrics_path).with_name("loss_curve.png")
        warnings.warn(f"plot: {png} not written, {exc}", stacklevel=2)
        return None
