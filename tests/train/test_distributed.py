"""Two processes on gloo (DDP and FSDP2) follow the same loss trajectory as one process with
the same global batch."""

import pytest

from fastllm.train.logging import read_metrics

from .conftest import as_args, run_cli, tiny


def _fields(tok_dir, text_file, out, batch_size, **kw):
    return tiny(tok_dir, out, data=text_file, seq_len=32, max_steps=5, batch_size=batch_size, grad_accum=2,
                eval_batches=1, **kw)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tok_dir, text_file):
    out = tmp_path_factory.mktemp("single")
    res = run_cli(["pretrain", *as_args(_fields(tok_dir, text_file, out, 4))])
    assert res.returncode == 0, res.stdout + res.stderr
    return read_metrics(out / "metrics.jsonl"), read_metrics(out / "metrics.jsonl", "eval_loss")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, tok_dir, text_file, single, mode):
    res = run_cli(["pretrain", *as_args(_fields(tok_dir, text_file, tmp_path, 2, distributed=mode))], nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    losses = read_metrics(tmp_path / "metrics.jsonl")
    ref_losses, ref_eval = single
    assert list(losses) == list(ref_losses) == [1, 2, 3, 4, 5]
    for step in losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, losses, ref_losses)
    eval_loss = read_metrics(tmp_path / "metrics.jsonl", "eval_loss")
    assert eval_loss[5] == pytest.approx(ref_eval[5], rel=1e-5)
