"""The step loop's bookkeeping, with a stand-in step_fn (no model): which steps run, when it
evaluates, logs and checkpoints, the error of a non-finite step, the loss-curve plot."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from fastllm.train.config import TrainConfig
from fastllm.train.distributed import DistInfo
from fastllm.train.loop import train_loop


def _cfg(out, **kw):
    fields = dict(output_dir=str(out), max_steps=7, log_every=3, eval_every=2, save_every=3, progress=False,
                  plot=False)
    fields.update(kw)
    return TrainConfig(**fields)


def _saver(out, saved):
    """A save(step) that records the step and leaves a complete (if tiny) checkpoint directory
    with the files the real one writes, so checkpoint discovery accepts it."""
    def save(step):
        saved.append(step)
        path = out / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))
        torch.save({}, path / "optimizer.pt")
        (path / "state.json").write_text(json.dumps({"step": step}))
    return save


def _steps(step):
    return {"loss": 10.0 - step, "tokens": 5}


def test_steps_eval_log_and_checkpoints_from_a_resumed_step(tmp_path):
    ran, saved, evals = [], [], []

    def step_fn(step):
        ran.append(step)
        return _steps(step)

    def evaluate():
        evals.append(2 + len(ran))  # the steps done when it is called
        return {"eval_loss": 100.0 + len(evals)}

    result = train_loop(_cfg(tmp_path), DistInfo(), 2, step_fn, save=_saver(tmp_path, saved), evaluate=evaluate)
    assert ran == [2, 3, 4, 5, 6]  # steps 3..7 after a resume at 2
    assert evals == [4, 6, 7]  # every eval_every steps before the end, then the final evaluation
    assert saved == [3, 6, 7]  # every save_every steps before the end, then the final checkpoint
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # every log_every steps, the last step, each evaluated step, and the final evaluation
    assert [r["step"] for r in records] == [3, 4, 6, 7, 7]
    assert records[0]["loss"] == 8.0 and records[0]["tokens"] == 5 and records[0]["tokens_per_s"] > 0
    assert "eval_loss" not in records[0]
    assert records[1]["eval_loss"] == 101.0 and records[2]["eval_loss"] == 102.0
    assert records[4] == {"step": 7, "eval_loss": 103.0}
    assert result == {"step": 7, "loss": 4.0, "output_dir": str(tmp_path), "eval_loss": 103.0}


def test_nonfinite_step_names_the_step_and_the_last_good_checkpoint(tmp_path):
    def step_fn(step):
        if step == 4:
            raise FloatingPointError("loss: non-finite value nan")
        return _steps(step)

    saved = []
    with pytest.raises(FloatingPointError, match=r"^loss: non-finite value nan at step 5: training stopped; "
                                                 r"last good checkpoint: .*step_00000004$"):
        train_loop(_cfg(tmp_path / "a", save_every=2), DistInfo(), 0, step_fn, save=_saver(tmp_path / "a", saved))
    assert saved == [2, 4]  # no final checkpoint after the failed step
    with pytest.raises(FloatingPointError, match="at step 5: training stopped; last good checkpoint: none$"):
        train_loop(_cfg(tmp_path / "b", save_every=0), DistInfo(), 0, step_fn, save=_saver(tmp_path / "b", []))


def test_plot_writes_the_loss_curve(tmp_path):
    pytest.importorskip("matplotlib", reason="plot=True needs matplotlib: pip install fastllm[plot]")
    result = train_loop(_cfg(tmp_path, plot=True), DistInfo(), 0, _steps, save=_saver(tmp_path, []))
    assert result["loss_curve"] == str(tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_warns_once_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning) as caught:
        result = train_loop(_cfg(tmp_path, plot=True), DistInfo(), 0, _steps, save=_saver(tmp_path, []))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "loss_curve.png not written" in messages[0]
    assert "pip install fastllm[plot]" in messages[0] and "pip install matplotlib" in messages[0]
    assert result["step"] == 7 and "loss_curve" not in result
    assert not (tmp_path / "loss_curve.png").exists()
