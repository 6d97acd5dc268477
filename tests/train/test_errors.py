"""Wrong input as a user meets it (Python API and CLI): every mistake fails with a message that
names the field or file, what was expected and what came; a damaged newest checkpoint is
skipped in favour of the newest complete one."""

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fastllm.train import PretrainConfig, SFTConfig, load_config, pretrain
from fastllm.train.checkpoint import checkpoint_problem, latest_checkpoint, load_checkpoint, save_checkpoint
from fastllm.train.config import describe_fields

from .conftest import run_cli, tiny

# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, message", [
    ("betas=0.9", r"betas: expected a list of 2 numbers .*got 0\.9"),
    ("betas=[0.9]", r"betas: expected a list of 2 numbers .*got \[0\.9\]"),
    ("output_dir=2024", r"output_dir: expected a string .*got 2024 \(int\)"),
    ("resume=true", r"resume: expected a string or null .*got True \(bool\)"),
    ("tokenizer=5", r"tokenizer: expected a string or null .*got 5"),
    ("save_every=-1", r"save_every: expected a value >= 0, got -1"),
    ("batch_size=0", r"batch_size: expected a value >= 1, got 0"),
    ("eval_fraction=2", r"eval_fraction: expected a value in \[0\.0, 1\.0\], got 2\.0"),
    ("schedule=cosin", r"schedule: expected one of cosine \| linear \| constant, got 'cosin'"),
    ("device=gpu", r"device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("freeze=3", r"freeze: expected a list of strings .*got 3"),
    ("max_steps=abc", r"max_steps: expected an integer .*got 'abc'"),
])
def test_config_values_name_field_and_expectation(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(SFTConfig, None, [override])


def test_config_checked_from_python_and_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"betas: expected a list of 2 numbers"):
        SFTConfig(betas=0.9)
    with pytest.raises(ValueError, match=r"keep_last: expected a value >= 0, got -3"):
        PretrainConfig(keep_last=-3)
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: 2024\n")
    with pytest.raises(ValueError, match=r"output_dir: expected a string"):
        load_config(PretrainConfig, path)
    # what is accepted is coerced to the declared type
    cfg = load_config(PretrainConfig, None, ["betas=[0.8, 0.9]", "lr=1", "data=[a.txt, b.txt]"])
    assert cfg.betas == (0.8, 0.9) and isinstance(cfg.lr, float) and cfg.data == ["a.txt", "b.txt"]
    assert SFTConfig(output_dir=tmp_path).output_dir == str(tmp_path)


def test_nested_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"peft\.targets not an argument of fastllm\.peft\.apply_lora; valid keys: "
                                         r"method, target_modules, r, alpha"):
        load_config(SFTConfig, None, ["peft.method=lora", "peft.targets=[q_proj]"])
    with pytest.raises(ValueError, match=r"peft\.reduction not an argument of fastllm\.peft\.apply_adapters; "
                                         r"valid keys: method, kind, reduction_factor"):
        SFTConfig(peft={"method": "adapters", "reduction": 4})
    with pytest.raises(ValueError, match=r"peft\.method: expected one of adapters, lora, got 'lorax'"):
        SFTConfig(peft={"method": "lorax"})
    with pytest.raises(ValueError, match=r"model_overrides: num_layers not a field of the 'tiny-llama' config "
                                         r"\(LlamaConfig\); valid keys: .*num_hidden_layers"):
        load_config(PretrainConfig, None, ["model_overrides.num_layers=3"])
    cfg = load_config(SFTConfig, None, ["peft.r=4", "peft.target_modules=[q_proj]", "model_overrides.hidden_size=32"])
    assert cfg.peft == {"r": 4, "target_modules": ["q_proj"]} and cfg.model_overrides == {"hidden_size": 32}


def test_objective_must_fit_the_model(tmp_path, tok_dir, text_file):
    with pytest.raises(ValueError, match=r"objective: mlm needs an encoder .* LlamaForCausalLM is a decoder"):
        pretrain(tiny(tok_dir, tmp_path, objective="mlm", data=text_file, seq_len=32, max_steps=1))
    with pytest.raises(ValueError, match=r"model: 'tiny-lama' is neither a preset \(.*tiny-llama"):
        pretrain(tiny(tok_dir, tmp_path, model="tiny-lama", data=text_file, seq_len=32, max_steps=1))


def test_cli_bad_value_is_one_line_naming_the_field(tmp_path):
    res = run_cli(["pretrain", "betas=0.9", f"output_dir={tmp_path}"], timeout=120)
    assert res.returncode != 0
    assert "fastllm pretrain: betas: expected a list of 2 numbers" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command, cls", [("pretrain", PretrainConfig), ("sft", SFTConfig)])
def test_cli_help_lists_every_field(command, cls):
    res = run_cli([command, "--help"], timeout=120)
    assert res.returncode == 0, res.stderr
    for f in cls.__dataclass_fields__.values():
        line = next((ln for ln in res.stdout.splitlines() if ln.split()[:1] == [f.name]), None)
        assert line is not None, f"{f.name} missing from --help"
        assert f.metadata["help"][:30] in line and "default" in line
    assert re.search(r"^\s+betas\s+\[float, float\]\s+default \[0\.9, 0\.95\]", res.stdout, re.M)
    assert re.search(r"^\s+save_every\s+int\s+default 0: .*\[>= 0\]", res.stdout, re.M)
    assert res.stdout.count("\n  ") >= len(cls.__dataclass_fields__)
    assert describe_fields(cls) in res.stdout


# --------------------------------------------------------------------------- damaged checkpoints


def _save(out, step):
    return save_checkpoint(out, step, model_state={"w": torch.full((64,), float(step))},
                           optimizer_state={"state": {"w": {"exp_avg": torch.ones(64)}}, "param_groups": []},
                           rng={"torch": [1, 2]}, state={"data": {"position": step}}, keep_last=3)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _truncate(d / "model.safetensors"), r"model\.safetensors is truncated"),
    (lambda d: _truncate(d / "model.safetensors", 0.02), r"model\.safetensors is truncated"),
    (lambda d: _truncate(d / "optimizer.pt"), r"optimizer\.pt is truncated or unreadable"),
    (lambda d: (d / "state.json").unlink(), r"state\.json is missing"),
    (lambda d: (d / "optimizer.pt").unlink(), r"optimizer\.pt is missing"),
    (lambda d: (d / "state.json").write_text("{\"step\": 6"), r"state\.json is unreadable"),
])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage, reason):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    newest = tmp_path / "checkpoints" / "step_00000006"
    assert checkpoint_problem(newest) is None
    damage(newest)
    assert re.search(reason, checkpoint_problem(newest))
    with pytest.warns(UserWarning, match=r"skipping the damaged checkpoint .*step_00000006.* \(" + reason):
        found = latest_checkpoint(tmp_path)
    assert found.name == "step_00000004"
    assert torch.equal(load_checkpoint(found)["model"]["w"], torch.full((64,), 4.0))
    with pytest.raises(ValueError, match=r"resume: the checkpoint .*step_00000006.* is damaged: " + reason):
        load_checkpoint(newest)
    _save(tmp_path, 5)  # a run resumed from step 4 writes step 5 and drops the abandoned step 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path).name == "step_00000005"


def test_pretrain_resumes_from_newest_complete_checkpoint(tmp_path, tok_dir, text_file):
    out = tmp_path / "run"
    fields = tiny(tok_dir, out, data=text_file, seq_len=32, max_steps=4, save_every=2, eval_batches=0)
    pretrain(fields)
    ckpts = out / "checkpoints"
    step2 = load_file(ckpts / "step_00000002" / "model.safetensors")
    _truncate(ckpts / "step_00000004" / "model.safetensors")
    # the same run, started again: it must resume from step 2, not fail and not start afresh
    with pytest.warns(UserWarning, match=r"step_00000004.*model\.safetensors is truncated"):
        result = pretrain({**fields, "max_steps": 4})
    assert result["step"] == 4
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 3, 4], steps  # the second run re-did steps 3 and 4 only
    assert set(step2)  # step 2 was intact and is what was loaded
    assert checkpoint_problem(ckpts / "step_00000004") is None  # rewritten whole
