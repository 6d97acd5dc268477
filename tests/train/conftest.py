"""Fixtures for the training-loop tests: a small SentencePiece tokenizer trained once, a
short text corpus, and tiny configs (2-layer, hidden 64) that run a step in milliseconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastllm.data import load_corpus
from fastllm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    """About 40 KB of Shakespeare in one file."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(load_corpus("shakespeare")[0][:40_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, text_file) -> str:
    path = tmp_path_factory.mktemp("tok")
    with open(text_file, encoding="utf-8") as f:
        Tokenizer.train([f.read()], vocab_size=400).save(path)
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    """Eight short prompt records (.jsonl) for the PPO and GRPO command lines."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w} again"}) + "\n"
                            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")))
    return path


def assert_grad_accum_splits_agree(train, tmp_path, keys=("loss", "grad_norm", "margin")) -> None:
    """The same 4 pairs per step as 1 x 4, 2 x 2 and 4 x 1 micro-batches: train(out, batch_size,
    grad_accum) runs 3 steps into `out`, and every step's logged `keys` (the loss, the gradient's
    norm before clipping, ...) agree across the splits (on row-invariant products:
    tests.conftest.row_invariant_products)."""
    from fastllm.train.logging import read_metrics
    from tests.conftest import row_invariant_products

    runs = []
    with row_invariant_products():
        for bs, accum in ((4, 1), (2, 2), (1, 4)):
            out = tmp_path / f"{bs}"
            train(out, bs, accum)
            runs.append([read_metrics(out / "metrics.jsonl", k) for k in keys])
    for other in runs[1:]:
        for got, want in zip(other, runs[0], strict=True):
            assert list(got) == list(want) == [1, 2, 3]
            for step in got:
                assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (got, want)


def tiny(tok_dir, out, **kw) -> dict:
    """Fields of a tiny, fast, quiet run."""
    base = dict(model="tiny-llama", tokenizer=tok_dir, output_dir=str(out), max_steps=6, batch_size=4,
                warmup_steps=2, lr=3e-3, eval_batches=2, progress=False, plot=False, seed=1)
    base.update(kw)
    return base


def run_cli(args: list[str], nproc: int = 1, timeout: int = 240,
            **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run `fastllm ...` (under torchrun with nproc > 1) with single-threaded, repeatable math."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastllm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "fastllm.cli", *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def as_args(fields: dict) -> list[str]:
    out = []
    for k, v in fields.items():
        if v is None:
            v = "null"
        elif isinstance(v, bool):
            v = str(v).lower()
        out.append(f"{k}={v}")
    return out


def one_vs_two_processes(command: str, fields: dict, override: str, tmp_path, keys) -> subprocess.CompletedProcess:
    """Run `fastllm <command>` from a YAML config (written from fields) plus `override` on one
    process, then on two gloo processes with half the batch each into tmp_path/two; assert both
    succeed and log the same value of every key at every step. Returns the one-process run."""
    import json

    import pytest

    from fastllm.train.logging import read_metrics

    config = tmp_path / f"{command}.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    one = run_cli([command, str(config), override])
    assert one.returncode == 0, one.stdout + one.stderr
    two = run_cli([command, str(config), override, f"batch_size={fields['batch_size'] // 2}",
                   f"output_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    for key in keys:
        a = read_metrics(tmp_path / "one" / "metrics.jsonl", key)
        b = read_metrics(tmp_path / "two" / "metrics.jsonl", key)
        assert list(a) == list(b) and a, (key, a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (key, a, b)
    return one
