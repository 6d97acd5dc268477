import pytest

from fastllm.train import PretrainConfig, SFTConfig, apply_overrides, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-llama\nlr: 1e-3\nmax_steps: 7\nfreeze: ['*embed*']\npeft:\n  method: lora\n  r: 4\n")
    cfg = load_config(SFTConfig, path, ["lr=2e-4", "peft.r=8", "betas=[0.8, 0.9]", "system=null", "warmup_steps=3"])
    assert cfg.model == "tiny-llama" and cfg.max_steps == 7 and cfg.freeze == ["*embed*"]
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.peft == {"method": "lora", "r": 8}
    assert cfg.betas == (0.8, 0.9) and cfg.system is None and cfg.warmup_steps == 3


def test_int_becomes_float_and_defaults():
    cfg = apply_overrides(PretrainConfig(), ["lr=1", "objective=mlm"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.objective == "mlm"
    assert PretrainConfig().seq_len == 128


@pytest.mark.parametrize("bad, msg", [
    (["lrr=1"], "lrr: not a field of PretrainConfig"),
    (["max_steps=1.5"], "max_steps: expected an integer"),
    (["progress=maybe"], "progress: expected true or false"),
    (["noequals"], "expected key=value"),
])
def test_bad_overrides(bad, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(PretrainConfig, None, bad)


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nonsense: 3\n")
    with pytest.raises(ValueError, match="nonsense: not a field"):
        load_config(PretrainConfig, path)
