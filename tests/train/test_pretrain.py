import json
import math

import numpy as np
import pytest
import torch

from fastllm import models
from fastllm.train import PretrainConfig, pretrain
from fastllm.train.checkpoint import list_checkpoints, load_checkpoint
from fastllm.train.logging import read_metrics

from .conftest import tiny


def test_causal_lm_learns_and_writes_everything(tmp_path, tok_dir, text_file):
    out = tmp_path / "run"
    result = pretrain(tiny(tok_dir, out, data=text_file, max_steps=10, seq_len=64, save_every=4, keep_last=2))
    losses = read_metrics(out / "metrics.jsonl")
    assert list(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.5, losses
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000008", "step_00000010"]
    state = load_checkpoint(list_checkpoints(out)[-1])["state"]
    assert state["step"] == 10 and state["data"]["position"] > 0
    reloaded = models.from_pretrained(out / "final")
    assert reloaded.config.vocab_size == 400
    rec = [json.loads(line) for line in open(out / "metrics.jsonl")][0]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step"} <= set(rec)


def test_masked_lm(tmp_path, tok_dir, text_file):
    result = pretrain(tiny(tok_dir, tmp_path, model="tiny-bert", objective="mlm", data=text_file, seq_len=64,
                           max_steps=4))
    assert math.isfinite(result["loss"]) and math.isfinite(result["eval_loss"])
    assert 0 < result["eval_tokens"] < 2 * 4 * 64  # only the ~15% masked positions count


def test_token_bin_file(tmp_path):
    ids = np.random.default_rng(0).integers(0, 128, 5000).astype(np.uint16)
    ids.tofile(tmp_path / "tokens.bin")
    result = pretrain(tiny(None, tmp_path / "run", data=str(tmp_path / "tokens.bin"), seq_len=32, max_steps=3))
    assert math.isfinite(result["loss"])
    ids[123] = 300  # outside tiny-llama's vocabulary of 128
    ids.tofile(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"token id 300 .* outside the vocabulary \[0, 128\)"):
        pretrain(tiny(None, tmp_path / "run2", data=str(tmp_path / "bad.bin"), seq_len=32, max_steps=3))


def test_bad_input_fails_before_training(tmp_path, tok_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="data: empty dataset"):
        pretrain(tiny(tok_dir, tmp_path / "a", data=str(empty)))
    with pytest.raises(ValueError, match="256 tokens exceed the model's context of 128"):
        pretrain(tiny(tok_dir, tmp_path / "b", data="shakespeare", seq_len=256))
    with pytest.raises(ValueError, match="tokenizer: its vocabulary has 400 tokens but the model's vocab_size is 128"):
        pretrain(tiny(tok_dir, tmp_path / "c", data="shakespeare", model_overrides={"vocab_size": 128}))
    for sub in "abc":
        assert not (tmp_path / sub / "metrics.jsonl").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tok_dir, text_file):
    torch.manual_seed(0)
    model = models.build_model(models.preset("tiny-llama", vocab_size=400))
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    model.model.norm.register_forward_hook(poison)
    cfg = PretrainConfig(**tiny(tok_dir, tmp_path, data=text_file, seq_len=32, max_steps=8, save_every=2,
                                eval_batches=0))
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 5: training stopped; last good checkpoint: "
                                                 r".*step_00000004"):
        pretrain(cfg, model=model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    weights = load_checkpoint(list_checkpoints(tmp_path)[-1])["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
