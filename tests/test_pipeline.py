"""End to end: `fastllm pipeline --quick` on the shipped data. Every stage runs and improves
what it optimises on held-out data (losses fall; each task head, the reward model and DPO's
preference accuracy beat their chance level; PPO and GRPO raise the reward model's mean score
of their samples with a bounded KL to the SFT model), the report files exist, exported models load in
transformers with their tokenizer, and a run stopped half-way resumes without redoing a
finished stage."""

import json
import math

import pytest

from fastllm.pipeline import STAGES, PipelineOptions, plan, run_pipeline
from fastllm.pipeline import run as run_mod
from fastllm.pipeline.report import format_table


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


def test_task_heads_beat_chance(pipeline_run):
    _, _, _, summary = pipeline_run
    heads = {r["head"]: r for r in next(r for r in summary["stages"] if r["stage"] == "heads")["rows"]}
    assert list(heads) == ["topics", "sentiment", "entities"]
    assert heads["entities"]["trunk"] == "mlm" and heads["topics"]["trunk"] == heads["sentiment"]["trunk"] == "pretrain"
    topics, sentiment, entities = heads["topics"], heads["sentiment"], heads["entities"]
    # topics: 4 classes, the majority class is about 0.3 of the held-out records
    assert topics["chance"] < 0.4 and topics["after"] > topics["chance"] + 0.3, topics
    assert topics["after_scores"]["macro_f1"] > topics["before_scores"]["macro_f1"] + 0.3, topics
    # sentiment optimises squared error: the MSE falls below the untrained head's and the
    # training mean's; Pearson r of a constant is 0, sd of r on 200 unrelated pairs about 0.07
    assert sentiment["eval_records"] == 200 and sentiment["after"] > 0.2, sentiment
    mse = {k: sentiment[f"{k}_scores"]["mse"] for k in ("before", "after", "chance")}
    assert mse["after"] < min(mse["before"], mse["chance"]), sentiment
    # entities: tagging every word O finds no entity
    assert entities["after"] > 0.2 and entities["after_scores"]["tag_accuracy"] > 0.7, entities
    for r in (topics, entities):
        assert r["after"] > r["before"] and r["after"] > r["chance"], r
    for r in heads.values():
        assert r["improved"] and r["beats_chance"], r
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["trainable_params"] > 0


def test_reward_model_and_dpo_beat_chance(pipeline_run):
    _, _, _, summary = pipeline_run
    rows = {r["stage"]: r for r in summary["stages"]}
    rm, dpo = rows["reward"], rows["dpo"]
    # about 98 held-out pairs: a coin flip is 0.5 with sd 0.05
    assert rm["eval_pairs"] > 60 and rm["after"] > 0.62, rm
    assert rm["after_scores"]["loss"] < math.log(2) < rm["before_scores"]["loss"] + 0.1, rm
    # at step 0 the policy is its reference: every implicit reward is 0, a tie, loss ln 2
    assert dpo["before"] == 0.0 and dpo["before_scores"]["margin"] == 0.0
    assert dpo["before_scores"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["after"] > 0.62 and dpo["after_scores"]["margin"] > 0, dpo
    assert dpo["after_scores"]["loss"] < math.log(2), dpo
    assert [r["prompt"] for r in summary["extra"]["dpo"]["samples"]] == \
        [r["prompt"] for r in summary["extra"]["sft"]["samples"]]


def test_ppo_and_grpo_raise_the_mean_reward_with_a_bounded_kl(pipeline_run):
    out, _, _, summary = pipeline_run
    rows = {r["stage"]: r for r in summary["stages"]}
    for name in ("ppo", "grpo"):
        r = rows[name]
        before, after = r["before_scores"], r["after_scores"]
        # the same prompts and random numbers before and after; before the policy is its reference
        assert before["rollouts"] == after["rollouts"] == 64 * 4, r
        assert before["kl"] == 0.0, r
        # the rise beats twice the standard error of the difference of two independent means (an
        # overestimate: the shared random numbers correlate the two samples positively)
        se = math.hypot(before["reward_sd"], after["reward_sd"]) / math.sqrt(after["rollouts"])
        assert after["reward"] - before["reward"] > 2 * se, (name, before, after, se)
        assert r["improved"] and r["after"] == after["reward"] and r["before"] == before["reward"]
        # KL(policy || SFT) per response of at most 16 tokens: positive, finite, well below
        # what an unconstrained policy reaches (several nats per token)
        assert 0.0 < after["kl"] < 8.0 and r["kl_text"] == f"{after['kl']:.3f}", r
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["steps"] == 40 and r["trainable_params"] > 0
        assert r["rl_curves"].endswith(f"{name}_curves.png") and (out / name / f"{name}_curves.png").is_file()
    assert rows["ppo"]["trainable_params"] > rows["grpo"]["trainable_params"]  # PPO also trains its critic
    samples = summary["extra"]
    assert [r["prompt"] for r in samples["ppo"]["samples"]] == [r["prompt"] for r in samples["pretrain"]["samples"]]
    assert [r["prompt"] for r in samples["grpo"]["samples"]] == [r["prompt"] for r in samples["sft"]["samples"]]
    md = (out / "report.md").read_text()
    assert "**after ppo**" in md and "| KL |" in md


def test_report_files(pipeline_run):
    out, _, _, summary = pipeline_run
    md = (out / "report.md").read_text()
    for s in STAGES:
        assert f"| {s.name} " in md or f"| {s.name}: " in md, s.name
    for head in ("topics", "sentiment", "entities"):
        assert f"| heads: {head} |" in md
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
    assert plan(["heads"], set(), None) == ["tokenizer", "pretrain", "mlm", "heads"]
    assert plan(["heads"], set(), "some/hf_dir") == ["tokenizer", "mlm", "heads"]  # the encoder is ours
    assert plan(["dpo", "reward"], {"tokenizer"}, None) == ["pretrain", "sft", "reward", "dpo"]
    assert plan(["ppo"], set(), None) == ["tokenizer", "pretrain", "sft", "reward", "ppo"]
    assert plan(["grpo"], {"tokenizer", "pretrain", "sft", "reward"}, None) == ["grpo"]
    with pytest.raises(ValueError, match="unknown stage"):
        plan(["pretrain", "nope"], set(), None)


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"settings": {"quick": False}, "stages": {}}))
    with pytest.raises(ValueError, match="other settings"):
        run_mod._load_state(tmp_path, {"quick": True})


def test_table_expands_multi_model_stages_and_shows_kl_only_when_reported():
    row = {"stage": "pretrain", "optimised": "x", "metric": "m", "before_text": "1", "after_text": "0.5"}
    heads = {"stage": "heads", "rows": [{"head": "topics", "metric": "acc", "before_text": "0.3", "after_text": "0.9",
                                         "chance_text": "0.3"}]}
    table = format_table([row, heads])
    lines = table.splitlines()
    assert "KL" not in lines[0] and "| chance |" in lines[0]
    assert lines[3].startswith("| heads: topics | - | acc | 0.3 | 0.9 | 0.3 |")
    ppo = {"stage": "ppo", "metric": "mean reward", "before_text": "-0.1", "after_text": "0.4", "kl_text": "0.02"}
    lines = format_table([row, ppo]).splitlines()
    titles = [t.strip() for t in lines[0].strip("|").split("|")]
    assert titles[titles.index("after") + 1] == "KL"
    assert "| -0.1 | 0.4 | 0.02 |" in lines[3] and "| 1 | 0.5 | - |" in lines[2]
