"""End to end: `fastllm pipeline --quick` on the shipped data. Every stage runs and improves
what it optimises on held-out data, the report files exist, exported models load in
transformers with their tokenizer, and a run stopped half-way resumes without redoing a
finished stage."""

import json
import math

import pytest

from fastllm.pipeline import STAGES, PipelineOptions, plan, run_pipeline
from fastllm.pipeline import run as run_mod


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    opts = dict(output_dir=str(out), quick=True, device="cpu", progress=False)
    # 1) a subset: sft needs the tokenizer and pre-training, which run first; mlm does not run
    run_pipeline(PipelineOptions(stages=["sft"], **opts))
    first = json.loads((out / "state.json").read_text())
    # 2) everything, killed in the mlm stage (after the finished ones were skipped)
    mlm = next(s for s in STAGES if s.name == "mlm")
    real_run = mlm.run

    def killed(ctx):
        raise Killed("stopped")

    mlm.run = killed
    try:
        with pytest.raises(Killed):
            run_pipeline(PipelineOptions(**opts))
    finally:
        mlm.run = real_run
    killed_state = json.loads((out / "state.json").read_text())
    # 3) run again: resumes at mlm
    summary = run_pipeline(PipelineOptions(**opts))
    return out, first, killed_state, summary


def test_subset_runs_what_it_needs(pipeline_run):
    _, first, _, _ = pipeline_run
    assert list(first["stages"]) == ["tokenizer", "pretrain", "sft"]


def test_rerun_does_not_repeat_finished_stages(pipeline_run):
    out, first, killed_state, summary = pipeline_run
    final = json.loads((out / "state.json").read_text())
    assert list(killed_state["stages"]) == ["tokenizer", "pretrain", "sft"]  # the kill added nothing
    for name in ("tokenizer", "pretrain", "sft"):
        assert final["stages"][name]["finished_at"] == first["stages"][name]["finished_at"], name
        assert final["stages"][name]["row"] == first["stages"][name]["row"], name
    assert [r["stage"] for r in summary["stages"]] == [s.name for s in STAGES]


def test_every_stage_improves_what_it_optimises(pipeline_run):
    _, _, _, summary = pipeline_run
    rows = {r["stage"]: r for r in summary["stages"]}
    for name in ("pretrain", "mlm", "sft", "sft_layers"):
        r = rows[name]
        assert r["after"] < r["before"], (name, r["before"], r["after"])
        assert r["trainable_params"] > 0 and r["wall_s"] > 0 and r["tokens_per_s"] > 0
    # an untrained model is near chance: ln(vocab) nats per token
    vocab = rows["tokenizer"]["vocab_size"]
    assert abs(rows["pretrain"]["before"] - math.log(vocab)) < 0.5
    assert rows["tokenizer"]["after"] > 1.5  # bytes per token: merges compress
    assert rows["sft_layers"]["trainable_params"] < rows["sft"]["trainable_params"]
    peft = summary["extra"]["peft"]["peft"]
    assert [r["method"] for r in peft] == ["lora", "adapters", "prefix", "prompt"]
    for r in peft:
        assert r["after"] < r["before"], (r["method"], r["before"], r["after"])
        assert 0 < r["trainable_params"] < r["params"] / 10, r["method"]


def test_report_files(pipeline_run):
    out, _, _, summary = pipeline_run
    md = (out / "report.md").read_text()
    for s in STAGES:
        assert f"| {s.name} |" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert json.loads((out / "summary.json").read_text())["stages"] == json.loads(json.dumps(summary["stages"]))
    assert (out / "pretrain" / "loss_curve.png").is_file()
    samples = summary["extra"]
    assert [r["prompt"] for r in samples["pretrain"]["samples"]] == [r["prompt"] for r in samples["sft"]["samples"]]
    events = list((out / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_exported_models_load_in_transformers_with_their_tokenizer(pipeline_run):
    transformers = pytest.importorskip("transformers")
    from fastllm.tokenizer import load_tokenizer

    out, _, _, summary = pipeline_run
    for stage in ("pretrain", "sft"):
        path = summary["artefacts"][stage]["model"]
        ours = load_tokenizer(path)
        hf = transformers.AutoTokenizer.from_pretrained(path)
        text = "What is AI?\n  Thou  art 🙂"
        assert hf(text)["input_ids"] == ours.encode(text, add_bos=True)
        assert (hf.eos_token_id, hf.pad_token_id) == (ours.eos_id, ours.pad_id)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size >= ours.vocab_size


def test_plan_adds_what_is_needed_and_checks_names():
    assert plan(["peft"], set(), None) == ["tokenizer", "pretrain", "peft"]
    assert plan(["peft"], {"tokenizer", "pretrain"}, None) == ["peft"]
    assert plan(["sft"], set(), "some/hf_dir") == ["sft"]  # --model: no pre-training needed
    with pytest.raises(ValueError, match="unknown stage"):
        plan(["pretrain", "nope"], set(), None)


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"settings": {"quick": False}, "stages": {}}))
    with pytest.raises(ValueError, match="other settings"):
        run_mod._load_state(tmp_path, {"quick": True})
