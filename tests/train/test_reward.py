"""The reward-model trainer: the head reads the EOS (packed, left- or right-padded, never a pad
after it), the first step's loss equals `bradley_terry_loss` on rewards from separate forwards,
micro-batch splits do not change a step, a model trained on pairs labelled by a computable gold
reward ranks held-out pairs as the gold does, the shipped preference set is learned far above
chance, resume continues the run, the export loads in transformers with the same scores and
tokenizer ids (and transformers' reward models load here), and the CLI runs from YAML."""

import copy
import json
import random

import pytest
import torch

from fastllm import models
from fastllm.cli import main
from fastllm.data import BatchLoader, PreferenceDataset, load_preferences, train_test_split
from fastllm.models.heads import TaskHead, build_head_model
from fastllm.rl import bradley_terry_loss
from fastllm.tokenizer import format_chat, load_tokenizer
from fastllm.tokenizer.base import TokenizerBase
from fastllm.train import RewardConfig, RewardScorer, reward
from fastllm.train.build import get_reward_model, pack_examples
from fastllm.train.logging import read_metrics
from fastllm.train.reward import PackedRewards, collate_pairs

from .conftest import assert_grad_accum_splits_agree, one_vs_two_processes, tiny

RECORDS = [r for r in load_preferences() if len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 100][:64]


def _model(seed: int, name: str = "tiny-llama", vocab: int = 400, pad: int = 3, **overrides):
    torch.manual_seed(seed)
    head = TaskHead(num_labels=1, problem_type="regression", pad_token_id=pad)
    return build_head_model(models.preset(name, vocab_size=vocab, **overrides), "sequence_classification", head)


def _fields(tok_dir, out, **kw):
    return tiny(tok_dir, out, **{"max_length": 128, "batch_size": 4, "eval_batches": 0, "normalize": False, **kw})


def _raw(model, ids: torch.Tensor) -> float:
    """Obviously-correct reward: one unpadded forward of the sequence alone, the head at its
    last token."""
    with torch.no_grad():
        return float(model.scores(ids[None])[0, 0])


class CharTokenizer(TokenizerBase):
    """One id per printable character, specials first: a vocabulary built by hand."""

    CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 3 + len(self.CHARS)

    def _encode_batch(self, texts):
        return [[3 + self.CHARS.index(c) for c in t] for t in texts]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_head_reads_the_eos_packed_left_and_right_padded(name):
    """Every layout scores a sequence as its own unpadded forward does; changing the tokens of
    the padding after the EOS changes nothing, changing the EOS changes the reward."""
    model = _model(0, name).eval()
    with torch.no_grad():
        model.score.weight.mul_(20)  # rewards of order 1, so a changed token shows
    eos, pad = 2, 3
    g = torch.Generator().manual_seed(1)
    seqs = [torch.cat([torch.randint(4, 400, (n - 1,), generator=g), torch.tensor([eos])]) for n in (5, 9, 7)]
    want = torch.tensor([_raw(model, s) for s in seqs])
    scorer = RewardScorer(model, None)
    packed = pack_examples([{"input_ids": s, "labels": s} for s in seqs])
    with torch.no_grad():
        got = PackedRewards(model)(packed["input_ids"], packed["position_ids"], packed["cu_seqlens"],
                                   packed["max_seqlen"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    T = 12
    for side in ("right", "left", "both"):
        ids, mask = torch.full((3, T), pad), torch.zeros(3, T, dtype=torch.long)
        for b, s in enumerate(seqs):
            start = {"right": 0, "left": T - len(s), "both": 1}[side]
            ids[b, start:start + len(s)], mask[b, start:start + len(s)] = s, 1
        got = scorer.score_tokens(ids, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=side)
        noisy = torch.where(mask.bool(), ids, torch.randint(4, 400, ids.shape, generator=g))
        torch.testing.assert_close(scorer.score_tokens(noisy, mask), got, rtol=1e-6, atol=1e-6, msg=side)
        last = (mask * torch.arange(T)).argmax(-1)
        changed = ids.clone()
        changed[torch.arange(3), last] = 5  # the EOS becomes another token: read there, the reward moves
        moved = scorer.score_tokens(changed, mask)
        torch.testing.assert_close(moved, torch.tensor([_raw(model, torch.cat([s[:-1], torch.tensor([5])]))
                                                        for s in seqs]), rtol=1e-5, atol=1e-5, msg=side)
        assert (moved - got).abs().min() > 1e-3, side


@pytest.mark.parametrize("margin", [0.0, 0.5, "margin"])
def test_first_step_equals_bradley_terry_by_hand(tmp_path, tok_dir, margin):
    tok = load_tokenizer(tok_dir)
    records = [dict(r, margin=0.25 * (i % 5)) for i, r in enumerate(RECORDS)]
    model = _model(0)
    initial = copy.deepcopy(model).eval()
    reward(_fields(tok_dir, tmp_path, max_steps=1, margin=margin), model=model, tokenizer=tok, records=records)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    data = PreferenceDataset(records, tok, max_length=128)
    idx = BatchLoader(list(range(len(data))), 4, seed=1, collate_fn=list).next_batch()  # the first batch's pairs
    r = {s: torch.tensor([_raw(initial, data[i][f"{s}_input_ids"]) for i in idx]) for s in ("chosen", "rejected")}
    m = torch.tensor([records[i]["margin"] for i in idx]) if margin == "margin" else margin
    want = bradley_terry_loss(r["chosen"], r["rejected"], m)
    assert rec["pairs"] == 4 and rec["tokens"] == sum(data[i][f"{s}_input_ids"].numel()
                                                      for i in idx for s in ("chosen", "rejected"))
    assert rec["loss"] == pytest.approx(float(want.mean()), rel=1e-5, abs=1e-6)
    assert rec["rewards/chosen"] == pytest.approx(float(r["chosen"].mean()), rel=1e-5, abs=1e-6)
    assert rec["rewards/rejected"] == pytest.approx(float(r["rejected"].mean()), rel=1e-5, abs=1e-6)
    assert rec["margin"] == pytest.approx(float((r["chosen"] - r["rejected"]).mean()), rel=1e-5, abs=1e-6)
    assert rec["accuracy"] == float((r["chosen"] > r["rejected"]).float().mean())
    if margin == "margin":  # the per-record margins differ from any constant: they changed the loss
        assert rec["loss"] != pytest.approx(float(bradley_terry_loss(r["chosen"], r["rejected"]).mean()), rel=1e-4)


def test_grad_accum_split_does_not_change_the_step(tmp_path, tok_dir):
    """4 pairs per step as 1 x 4, 2 x 2 and 4 x 1 micro-batches: every step's loss and gradient
    norm agree (the loss is summed over pairs, divided by the step's pairs)."""
    assert_grad_accum_splits_agree(
        lambda out, bs, accum: reward(_fields(tok_dir, out, max_steps=3, batch_size=bs, grad_accum=accum),
                                  model=_model(0), records=RECORDS), tmp_path)


def _gold_pairs(n: int, seed: int) -> list[dict]:
    """Responses are random strings of 4..12 letters from 'abcd'; the gold reward is how many
    'a' a response holds; the chosen side of a pair is the one with more."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        x, y = ("".join(rng.choice("abcd") for _ in range(rng.randint(4, 12))) for _ in range(2))
        if x.count("a") != y.count("a"):
            hi, lo = (x, y) if x.count("a") > y.count("a") else (y, x)
            out.append({"prompt": "a?", "chosen": hi, "rejected": lo})
    return out


def test_gold_reward_is_learned_and_normalised(tmp_path):
    """A 1-layer decoder on 300 training pairs labelled by the gold reward (count of 'a') ranks
    >= 95% of 100 held-out pairs as the gold does; its normalised rewards have mean 0 and std 1
    on the reference (held-out) pairs and rise with the gold reward on fresh responses."""
    tok = CharTokenizer()
    records = _gold_pairs(400, seed=0)
    result = reward(dict(model="tiny-llama", model_overrides={"num_hidden_layers": 1}, output_dir=str(tmp_path),
                         max_steps=40, batch_size=16, lr=3e-3, warmup_steps=5, weight_decay=0.0, max_length=64,
                         eval_batches=100, eval_fraction=0.25, progress=False, plot=False, seed=0),
                    tokenizer=tok, records=records)
    assert result["eval_pairs"] == 100
    assert result["eval_accuracy"] >= 0.95 and result["eval_margin"] > 0, result
    model = models.from_pretrained(tmp_path / "final")
    scorer = RewardScorer(model, tok)
    _, held = train_test_split(records, 0.25, seed=0)
    ref = torch.cat([scorer([r["prompt"] for r in held], [r[s] for r in held]) for s in ("chosen", "rejected")])
    assert result["reward_samples"] == ref.numel() == 200
    assert float(ref.mean()) == pytest.approx(0.0, abs=1e-4) and float(ref.std(correction=0)) == pytest.approx(1.0,
                                                                                                         abs=1e-4)
    fresh = [r["chosen"] for r in _gold_pairs(200, seed=1)] + [r["rejected"] for r in _gold_pairs(200, seed=1)]
    rewards = scorer(["a?"] * len(fresh), fresh)
    counts = torch.tensor([s.count("a") for s in fresh])
    means = [float(rewards[counts == c].mean()) for c in range(5)]
    assert means == sorted(means) and means[4] - means[0] > 2.0, means  # in units of the reference std


def test_shipped_preferences_beat_chance(tmp_path, tok_dir):
    """400 shipped pairs (300 trained on, ~100 held out, skipping pairs over 128 tokens), a tiny
    Llama, 60 steps: held-out accuracy far above the 50% of chance."""
    result = reward(tiny(tok_dir, tmp_path, max_length=128, too_long="skip", batch_size=8, max_steps=60, lr=3e-3,
                         warmup_steps=5, weight_decay=0.0, eval_every=20, eval_batches=20, eval_fraction=0.25),
                    records=load_preferences()[:400])
    acc = read_metrics(tmp_path / "metrics.jsonl", "eval_accuracy")
    assert list(acc) == [20, 40, 60]
    assert result["eval_pairs"] >= 80
    assert result["eval_accuracy"] >= 0.8 and result["eval_margin"] > 0, acc


@pytest.mark.parametrize("peft", [None, {"method": "lora", "r": 4, "alpha": 8}])
def test_resume_repeats_the_losses(tmp_path, tok_dir, peft):
    fields = dict(schedule="constant", save_every=3, model_overrides={"num_hidden_layers": 1}, peft=peft)
    reward(_fields(tok_dir, tmp_path / "ref", max_steps=6, **fields), records=RECORDS)
    reward(_fields(tok_dir, tmp_path / "run", max_steps=3, **fields), records=RECORDS)
    reward(_fields(tok_dir, tmp_path / "run", max_steps=6, **fields), records=RECORDS)
    for key in ("loss", "margin"):
        want = read_metrics(tmp_path / "ref" / "metrics.jsonl", key)
        got = read_metrics(tmp_path / "run" / "metrics.jsonl", key)
        assert list(got) == list(want) == [1, 2, 3, 4, 5, 6]
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (key, got, want)


def test_lora_trains_the_head_and_exports_the_merged_model(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    model = _model(0)
    head0, base0 = model.score.weight.detach().clone(), model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = reward(_fields(tok_dir, tmp_path, max_steps=3, peft={"method": "lora", "r": 4, "alpha": 8}),
                    model=model, tokenizer=tok, records=RECORDS)
    assert result["trainable_params"] == model.score.weight.numel() + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert not torch.equal(model.score.weight, head0)  # the fresh head was trained
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base0)  # the base was not
    final = models.from_pretrained(tmp_path / "final")
    assert not any("lora" in n for n in final.state_dict())
    batch = collate_pairs([PreferenceDataset(RECORDS[:6], tok, max_length=128)[i] for i in range(6)])
    args = (batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    with torch.no_grad():
        torch.testing.assert_close(PackedRewards(final.eval())(*args), PackedRewards(model.eval())(*args),
                                   rtol=1e-4, atol=1e-5)


def test_export_loads_in_transformers_with_the_same_scores_and_ids(tmp_path, tok_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    result = reward(_fields(tok_dir, tmp_path, max_steps=3, normalize=True, eval_batches=2, eval_fraction=0.25),
                    model=_model(0), tokenizer=tok, records=RECORDS)
    final = tmp_path / "final"
    ours = models.from_pretrained(final).eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_id
    scorer = RewardScorer(ours, tok)
    rows = [scorer.encode(r["prompt"], r["chosen"]) for r in RECORDS[:5]]
    for r, row in zip(RECORDS[:5], rows, strict=True):  # bos, prompt template, response, eos: as training built it
        prompt, full = format_chat((r["prompt"], r["chosen"]))
        pieces = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, full[len(prompt):])]
        assert [hf_tok.bos_token_id, *pieces[0], *pieces[1], hf_tok.eos_token_id] == row
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    mask = (torch.arange(T) < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
        raw = ours.scores(ids, attention_mask=mask)[:, 0]
    torch.testing.assert_close(raw, theirs, rtol=1e-4, atol=1e-4)
    normalised = (raw - result["reward_mean"]) / result["reward_std"]  # transformers gives the raw scores
    torch.testing.assert_close(scorer.score_tokens(ids, mask), normalised, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scorer([r["prompt"] for r in RECORDS[:5]], [r["chosen"] for r in RECORDS[:5]]),
                               normalised, rtol=1e-4, atol=1e-4)


def test_transformers_and_causal_lm_checkpoints_start_a_reward_model(tmp_path, tok_dir):
    """A transformers reward model loads with its head (same scores); a causal-LM checkpoint
    (an SFT model) gives its trunk to a fresh head."""
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    cfg = models.preset("tiny-llama", vocab_size=400).to_hf_dict()
    cfg.update(num_labels=1, pad_token_id=tok.pad_id, problem_type="regression")
    torch.manual_seed(5)
    hf = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(**cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = get_reward_model(RewardConfig(model=str(tmp_path / "hf"), max_length=64), tok).eval()
    ids = torch.randint(4, 400, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours.scores(ids)[:, 0], hf(ids).logits[:, 0], rtol=1e-4, atol=1e-4)
    lm = models.build_model(models.preset("tiny-llama", vocab_size=400)).eval()
    models.save_pretrained(lm, tmp_path / "lm")
    rm = get_reward_model(RewardConfig(model=str(tmp_path / "lm"), max_length=64), tok).eval()
    assert isinstance(rm, models.LlamaForSequenceClassification) and rm.head.pad_token_id == tok.pad_id
    with torch.no_grad():
        torch.testing.assert_close(rm(ids), lm(ids))
    reward(_fields(tok_dir, tmp_path / "run", model=str(tmp_path / "hf"), max_steps=1), records=RECORDS)


def test_bad_options(tmp_path, tok_dir):
    with pytest.raises(ValueError, match=r"margin: records\[1\]: field 'margin': expected a finite number"):
        reward(_fields(tok_dir, tmp_path, margin="margin"), records=[dict(RECORDS[0], margin=1.0), RECORDS[1]])
    with pytest.raises(ValueError, match="peft.method: a reward model supports lora"):
        reward(_fields(tok_dir, tmp_path, peft={"method": "adapters"}), records=RECORDS)
    with pytest.raises(ValueError, match="a reward model needs a decoder"):
        reward(_fields(tok_dir, tmp_path, model="tiny-bert"), records=RECORDS)
    with pytest.raises(ValueError, match=r"records\[0\]: missing keys \['rejected'\]"):
        reward(_fields(tok_dir, tmp_path), records=[{"prompt": "a", "chosen": "b"}])


def test_cli_yaml_and_two_processes_match_one(tmp_path, tok_dir, capsys):
    """`fastllm reward CONFIG.yaml key=value`; 2 gloo processes x 2 pairs == 1 process x 4 pairs."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:32]))
    fields = _fields(tok_dir, tmp_path / "one", max_steps=3, grad_accum=2, eval_batches=1, data=str(data))
    one = one_vs_two_processes("reward", fields, "margin=0.3", tmp_path,
                               ("loss", "grad_norm", "accuracy", "eval_loss", "eval_accuracy"))
    assert json.loads(one.stdout.strip().splitlines()[-1])["step"] == 3
    assert "margin: 0.3" in (tmp_path / "one" / "config.yaml").read_text()
    assert models.from_pretrained(tmp_path / "one" / "final").head.num_labels == 1
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    help_text = capsys.readouterr().out
    assert "normalize" in help_text and "Bradley-Terry margin" in help_text


def test_pad_equal_to_eos_warns(tmp_path):
    """transformers would read the token before the EOS when pad == eos: the run says so."""
    tok = CharTokenizer()
    tok.pad_id = tok.eos_id
    with pytest.warns(UserWarning, match="pad_id == eos_id"):
        reward(dict(model="tiny-llama", output_dir=str(tmp_path), max_steps=1, max_length=64, eval_batches=0,
                    normalize=False, progress=False, plot=False), tokenizer=tok, records=_gold_pairs(8, seed=0))
