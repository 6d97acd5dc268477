"""A training process killed with SIGKILL mid-run, started again, continues exactly the loss
trajectory of a run that was never interrupted."""

import os
import signal
import time

from fastllm.train.checkpoint import list_checkpoints
from fastllm.train.logging import read_metrics

from .conftest import as_args, run_cli, tiny


def _fields(tok_dir, text_file, out):
    return tiny(tok_dir, out, data=text_file, seq_len=64, max_steps=24, save_every=3, keep_last=2,
                eval_batches=0, batch_size=4, grad_accum=2, model_overrides="{num_hidden_layers: 4}")


def test_sigkill_then_resume_repeats_the_losses(tmp_path, tok_dir, text_file):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference runs alongside the run that gets killed
    ref = run_cli(["pretrain", *as_args(_fields(tok_dir, text_file, ref_dir))], background=True)
    proc = run_cli(["pretrain", *as_args(_fields(tok_dir, text_file, run_dir))], background=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 11:  # past the checkpoints at 3, 6 and 9
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    rc = proc.wait(timeout=60)
    assert ref.wait(timeout=240) == 0, ref.stdout.read().decode()[-3000:]
    expected = read_metrics(ref_dir / "metrics.jsonl")
    assert list(expected) == list(range(1, 25))
    assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc={rc}): {proc.stdout.read().decode()[-2000:]}"
    seen = read_metrics(metrics)
    assert 11 <= max(seen) < 24
    last_ckpt = int(list_checkpoints(run_dir)[-1].name.split("_")[1])
    assert 9 <= last_ckpt < max(seen) + 1

    resumed = run_cli(["pretrain", *as_args(_fields(tok_dir, text_file, run_dir))])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    got = read_metrics(metrics)  # the resumed run's records replace the repeated steps
    assert list(got) == list(range(1, 25))
    assert got == expected, {s: (got[s], expected[s]) for s in got if got[s] != expected[s]}
    with open(metrics) as f:  # steps after the checkpoint really were run twice
        assert sum(1 for line in f if f'"step": {last_ckpt + 1},' in line) == 2
