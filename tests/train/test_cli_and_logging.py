import json

import pytest

from fastllm.cli import main
from fastllm.train.logging import ProgressBar, plot_loss_curve, read_metrics

from .conftest import as_args, tiny


def test_cli_sft_with_yaml_and_overrides(tmp_path, tok_dir, capsys):
    records = tmp_path / "records.jsonl"
    with open(records, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: tiny-llama\ntokenizer: {tok_dir}\ndata: {records}\nmax_length: 64\nmax_steps: 50\n")
    fields = tiny(tok_dir, tmp_path / "out", max_steps=3)
    fields.pop("model"), fields.pop("tokenizer")
    assert main(["sft", str(cfg), *as_args(fields)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3  # the override won over the file
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    with pytest.raises(SystemExit, match="nonsense: not a field of SFTConfig"):
        main(["sft", str(cfg), "nonsense=1"])


def _metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4},
               {"step": 2, "eval_loss": 2.6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_loss_curve(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_loss_curve needs matplotlib: pip install fastllm[plot]")
    png = plot_loss_curve(_metrics_file(tmp_path))
    assert png == tmp_path / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_and_progress(tmp_path):
    path = _metrics_file(tmp_path)
    assert read_metrics(path) == {1: 3.0, 2: 2.4}  # the last record of a step wins
    assert read_metrics(path, "eval_loss") == {2: 2.6}

    import io
    stream = io.StringIO()
    bar = ProgressBar(10, enabled=True, stream=stream)
    bar.update(5, 2.25, 1000)
    assert "step 5/10" in stream.getvalue() and "loss 2.2500" in stream.getvalue() and "tok/s" in stream.getvalue()
    assert "ETA" in stream.getvalue()
