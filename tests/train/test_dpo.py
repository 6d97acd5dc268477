"""The DPO trainer: its loss equals `dpo_loss` on summed log-probs from separate forwards, the
packed forward matches separate and padded ones, the reference is the same precomputed or
live, micro-batch and process splits do not change the loss, resume continues the run, and
preference accuracy rises."""

import copy
import json
import math

import pytest
import torch

from fastllm import models
from fastllm.data import BatchLoader, PreferenceDataset, collate_padded, load_preferences
from fastllm.rl import dpo_loss
from fastllm.tokenizer import format_prompt, load_tokenizer
from fastllm.train import dpo
from fastllm.train.build import pack_pairs
from fastllm.train.dpo import SequenceLogProbs
from fastllm.train.logging import read_metrics

from .conftest import assert_grad_accum_splits_agree, one_vs_two_processes, tiny

RECORDS = [r for r in load_preferences() if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 100][:64]


def _model(seed: int, vocab: int = 400):
    torch.manual_seed(seed)
    return models.build_model(models.preset("tiny-llama", vocab_size=vocab))


def _fields(tok_dir, out, **kw):
    return tiny(tok_dir, out, **{"max_length": 128, "batch_size": 4, "eval_batches": 0, **kw})


def _seq_logp(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Obviously-correct log pi(response | prompt): one unpacked forward, full float64 logits,
    summed over the labelled (response) positions."""
    with torch.no_grad():
        logits = model.logits(model(ids[None])[0]).double()  # (L, V)
    logp = torch.log_softmax(logits, -1)
    m = labels != -100
    return float(logp[m].gather(-1, labels[m][:, None]).sum())


def test_prompt_response_boundary_and_one_bos(tok_dir):
    tok = load_tokenizer(tok_dir)
    data = PreferenceDataset(RECORDS[:8], tok, max_length=128)
    for i, rec in enumerate(RECORDS[:8]):
        item = data[i]
        prompt = [tok.bos_id] + tok.encode(format_prompt(rec["prompt"]))
        for side in ("chosen", "rejected"):
            ids, labels = item[f"{side}_input_ids"].tolist(), item[f"{side}_labels"].tolist()
            response = tok.encode(rec[side]) + [tok.eos_id]
            assert ids == prompt + response  # encoded apart: nothing merges across the boundary
            assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
            n = len(prompt)
            assert labels[: n - 1] == [-100] * (n - 1) and labels[-1] == -100
            assert labels[n - 1 : -1] == response  # every response token (eos included) is a target, once
    batch = pack_pairs([data[i] for i in range(3)])
    lengths = [data[i][f"{s}_input_ids"].numel() for s in ("chosen", "rejected") for i in range(3)]
    assert batch["cu_seqlens"].tolist() == [sum(lengths[:k]) for k in range(7)]
    assert batch["segment_ids"].tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["num_pairs"] == 3


def test_packed_logps_equal_separate_and_padded_forwards(tok_dir):
    tok = load_tokenizer(tok_dir)
    data = PreferenceDataset(RECORDS[:5], tok, max_length=128)
    items = [data[i] for i in range(5)]
    model = _model(0)
    batch = pack_pairs(items)
    got = SequenceLogProbs(model)(**{k: batch[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens",
                                                             "max_seqlen", "segment_ids")})
    assert got.shape == (10,)
    seqs = [(it[f"{s}_input_ids"], it[f"{s}_labels"]) for s in ("chosen", "rejected") for it in items]
    separate = torch.tensor([_seq_logp(model, ids, lab) for ids, lab in seqs])
    torch.testing.assert_close(got.double(), separate.double(), rtol=1e-5, atol=1e-4)
    padded = collate_padded([{"input_ids": i, "labels": lab} for i, lab in seqs], tok.pad_id)
    with torch.no_grad():
        logits = model.logits(model(padded["input_ids"], attention_mask=padded["attention_mask"])).double()
    labels = padded["labels"]
    tok_logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    from_padded = (tok_logp * (labels != -100)).sum(1)
    torch.testing.assert_close(got.double(), from_padded, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss_type, label_smoothing, reference",
                         [("sigmoid", 0.0, "precomputed"), ("ipo", 0.0, "live"), ("sigmoid", 0.2, "precomputed")])
def test_first_step_equals_dpo_loss_by_hand(tmp_path, tok_dir, loss_type, label_smoothing, reference):
    """Policy and reference differ (two random inits), so the step-1 loss is not log 2."""
    tok = load_tokenizer(tok_dir)
    policy, ref = _model(0), _model(1)
    initial = copy.deepcopy(policy)
    beta = 0.5
    dpo(_fields(tok_dir, tmp_path, max_steps=1, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                reference=reference), model=policy, tokenizer=tok, records=RECORDS, reference_model=ref)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    data = PreferenceDataset(RECORDS, tok, max_length=128)
    idx = BatchLoader(list(range(len(data))), 4, seed=1, collate_fn=list).next_batch()  # the first batch's pairs
    lp = {(m, s): torch.tensor([_seq_logp(model, data[i][f"{s}_input_ids"], data[i][f"{s}_labels"]) for i in idx])
          for m, model in (("pi", initial), ("ref", ref)) for s in ("chosen", "rejected")}
    want = dpo_loss(lp["pi", "chosen"], lp["pi", "rejected"], lp["ref", "chosen"], lp["ref", "rejected"], beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing)
    assert rec["pairs"] == 4 and rec["tokens"] == sum(data[i][f"{s}_input_ids"].numel()
                                                      for i in idx for s in ("chosen", "rejected"))
    assert rec["loss"] == pytest.approx(float(want.losses.mean()), rel=1e-5, abs=1e-5)
    assert abs(rec["loss"] - math.log(2)) > 1e-2
    # a reward is beta times a difference of two float32 sums of ~100 log-probs: its rounding
    # error is about float32's epsilon times the size of those sums
    tol = beta * torch.finfo(torch.float32).eps * float(sum(v.abs().max() for v in lp.values()))
    assert rec["rewards/chosen"] == pytest.approx(float(want.chosen_rewards.mean()), abs=tol)
    assert rec["rewards/rejected"] == pytest.approx(float(want.rejected_rewards.mean()), abs=tol)
    assert rec["margin"] == pytest.approx(float(want.margin.mean()), abs=tol)
    assert rec["accuracy"] == float(want.accuracy.mean())


@pytest.mark.parametrize("peft", [None, {"method": "lora", "r": 4, "alpha": 8}])
def test_reference_precomputed_equals_live(tmp_path, tok_dir, peft):
    """Live: the base with adapters disabled (LoRA) or a frozen copy of the initial model."""
    runs = {}
    for reference in ("precomputed", "live"):
        out = tmp_path / reference
        dpo(_fields(tok_dir, out, max_steps=4, reference=reference, peft=peft), model=_model(0), records=RECORDS)
        runs[reference] = [read_metrics(out / "metrics.jsonl", k) for k in ("loss", "rewards/chosen", "margin")]
    assert list(runs["live"][0]) == [1, 2, 3, 4]
    assert runs["live"][0][4] < runs["live"][0][1]  # the policy moved away from the reference
    for live, pre in zip(runs["live"], runs["precomputed"], strict=True):
        for step in live:
            assert live[step] == pytest.approx(pre[step], rel=1e-5, abs=1e-6), (step, live, pre)


def test_grad_accum_split_does_not_change_the_step(tmp_path, tok_dir):
    """The same 4 pairs per step as 1 x 4, 2 x 2 and 4 x 1 micro-batches: the loss and the
    gradient's norm (before clipping) of every step agree. (Not the logged margin: a difference
    of summed log-probabilities ~1000x its size, whose float32 rounding alone, summed in another
    order by another split, is ~1e-6 on some CPUs; the loss bounds it to 2x its own error.)"""
    assert_grad_accum_splits_agree(
        lambda out, bs, accum: dpo(_fields(tok_dir, out, max_steps=3, batch_size=bs, grad_accum=accum),
                                  model=_model(0), records=RECORDS), tmp_path, keys=("loss", "grad_norm"))


def test_resume_uses_the_initial_reference(tmp_path, tok_dir):
    """Stopped after a checkpoint and restarted, the run repeats the uninterrupted one: the
    precomputed reference comes from the initial weights, not the checkpoint's."""
    fields = dict(schedule="constant", save_every=3, model_overrides={"num_hidden_layers": 1})
    dpo(_fields(tok_dir, tmp_path / "ref", max_steps=6, **fields), records=RECORDS)
    dpo(_fields(tok_dir, tmp_path / "run", max_steps=3, **fields), records=RECORDS)
    dpo(_fields(tok_dir, tmp_path / "run", max_steps=6, **fields), records=RECORDS)
    want, got = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert list(got) == list(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (got, want)


def test_preference_accuracy_rises(tmp_path, tok_dir):
    records = load_preferences()[:200]
    result = dpo(tiny(tok_dir, tmp_path, max_length=128, too_long="skip", batch_size=8, max_steps=20,
                      eval_every=5, eval_batches=4, eval_fraction=0.2), records=records)
    acc = read_metrics(tmp_path / "metrics.jsonl", "eval_accuracy")
    assert list(acc) == [5, 10, 15, 20]
    assert result["eval_accuracy"] >= 0.75 and result["eval_margin"] > 0, acc  # chance is 0.5
    assert read_metrics(tmp_path / "metrics.jsonl")[20] < math.log(2) - 0.1
    assert models.from_pretrained(tmp_path / "final").config.vocab_size == 400


def test_bad_options(tmp_path, tok_dir):
    for kw, msg in ((dict(loss_type="hinge"), "loss_type: expected one of"),
                    (dict(reference="cached"), "reference: expected one of"),
                    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing: expected 0 with loss_type='ipo'"),
                    (dict(beta=0.0), "beta: expected a positive value")):
        with pytest.raises(ValueError, match=msg):
            dpo(_fields(tok_dir, tmp_path, **kw), records=RECORDS)
    with pytest.raises(ValueError, match=r"records\[0\]: missing keys \['rejected'\]"):
        dpo(_fields(tok_dir, tmp_path), records=[{"prompt": "a", "chosen": "b"}])


def test_cli_yaml_and_two_processes_match_one(tmp_path, tok_dir):
    """`fastllm dpo CONFIG.yaml key=value`; 2 gloo processes x 2 pairs == 1 process x 4 pairs."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:32]))
    fields = _fields(tok_dir, tmp_path / "one", max_steps=3, grad_accum=2, eval_batches=1, data=str(data))
    one = one_vs_two_processes("dpo", fields, "beta=0.2", tmp_path,
                               ("loss", "grad_norm", "accuracy", "eval_loss", "eval_accuracy"))
    assert json.loads(one.stdout.strip().splitlines()[-1])["step"] == 3
    assert "beta: 0.2" in (tmp_path / "one" / "config.yaml").read_text()
