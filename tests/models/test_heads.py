"""Task heads: parity with transformers in both directions, the token they read, a new head on a
causal-LM checkpoint, and their losses against plain PyTorch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastllm.models import build_model, from_pretrained, preset, save_pretrained
from fastllm.models.heads import (
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaForSequenceClassification,
    TaskHead,
    build_head_model,
)
from tests.conftest import assert_close

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PAD = 0
SEQ_HEADS = [("tiny-llama", 1), ("tiny-llama", 3), ("tiny-qwen2", 2), ("tiny-gpt2", 1), ("tiny-bert", 3)]


def _head(name, num_labels):
    pooling = "cls" if name == "tiny-bert" else "last"
    problem = "regression" if num_labels == 1 else "single_label_classification"
    return TaskHead(num_labels=num_labels, problem_type=problem, pooling=pooling, pad_token_id=PAD)


def _padded_batch(vocab=128):
    """Right-padded rows with the pad id only in the padding (real tokens are >= 1)."""
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _perturbed(model):
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name,num_labels", SEQ_HEADS)
def test_fastllm_head_loads_in_transformers_with_the_same_scores(name, num_labels, tmp_path):
    ours = _perturbed(build_head_model(preset(name), "sequence_classification", _head(name, num_labels)))
    save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.num_labels == num_labels
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        actual = ours.scores(ids, attention_mask=mask)
    assert actual.shape == (3, num_labels)
    assert (actual - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name,num_labels", SEQ_HEADS)
def test_transformers_head_loads_in_fastllm_with_the_same_scores(name, num_labels, tmp_path):
    cfg = preset(name).to_hf_dict()
    cfg.update(num_labels=num_labels, pad_token_id=PAD, problem_type=_head(name, num_labels).problem_type)
    torch.manual_seed(5)
    hf = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(**cfg))
    hf = _perturbed(hf)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert type(ours).__name__.endswith("ForSequenceClassification")
    assert ours.head.num_labels == num_labels
    ids, mask = _padded_batch()
    with torch.no_grad():
        assert (ours.scores(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max() <= TOL


def test_bert_token_classification_parity_both_ways(tmp_path):
    head = TaskHead(num_labels=5, problem_type="single_label_classification", pooling="cls",
                    id2label={0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"})
    ours = _perturbed(build_head_model(preset("tiny-bert"), "token_classification", head))
    save_pretrained(ours, tmp_path / "ours")
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.id2label[1] == "B-PER"
    ids, mask = _padded_batch()
    with torch.no_grad():
        assert (ours.token_logits(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max() <= TOL
    hf.save_pretrained(tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf")
    assert isinstance(back, BertForTokenClassification) and back.head.labels == head.labels
    with torch.no_grad():
        assert (back.token_logits(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max() <= TOL


def test_decoder_head_reads_the_last_real_token_for_left_right_and_packed_rows():
    model = _perturbed(build_head_model(preset("tiny-llama"), "sequence_classification", TaskHead(num_labels=2)))
    torch.manual_seed(6)
    seqs = [torch.randint(1, 128, (n,)) for n in (5, 9, 3)]
    alone = torch.cat([model.scores(s[None]) for s in seqs])
    T = 9
    right = torch.zeros(3, T, dtype=torch.long)
    left = torch.zeros(3, T, dtype=torch.long)
    rmask, lmask = torch.zeros_like(right), torch.zeros_like(left)
    for b, s in enumerate(seqs):
        right[b, :len(s)], rmask[b, :len(s)] = s, 1
        left[b, T - len(s):], lmask[b, T - len(s):] = s, 1
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    with torch.no_grad():
        assert_close(model.scores(right, attention_mask=rmask), alone)
        assert_close(model.scores(packed, cu_seqlens=cu), alone)
        # left padding with explicit positions restarting at the first real token
        positions = (lmask.cumsum(1) - 1).clamp_min(0)
        assert_close(model.scores(left, attention_mask=lmask, position_ids=positions), alone)
        # reading a pad instead would change the score
        assert not torch.allclose(model.scores(right), alone, atol=1e-4)


def test_new_head_on_a_causal_lm_checkpoint_keeps_the_trunk(tmp_path):
    lm = _perturbed(build_model(preset("tiny-llama")))
    save_pretrained(lm, tmp_path)
    rm = from_pretrained(tmp_path, cls=LlamaForSequenceClassification, head=TaskHead(num_labels=1))
    trunk = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head")}
    for k, v in trunk.items():
        assert torch.equal(rm.state_dict()[k], v), k
    assert rm.score.weight.shape == (1, 64) and rm.score.weight.abs().sum() > 0
    assert not rm.score.weight.is_meta
    with pytest.raises(ValueError, match="describes a LlamaForCausalLM, not a BertForSequenceClassification"):
        from_pretrained(tmp_path, cls=BertForSequenceClassification)
    with pytest.raises(TypeError, match="no language-model head"):
        rm.logits(torch.zeros(1, 64))


def test_head_losses_match_pytorch():
    torch.manual_seed(7)
    ids, mask = _padded_batch()
    cls = _perturbed(build_head_model(preset("tiny-llama"), "sequence_classification",
                                      TaskHead(num_labels=3, problem_type="single_label_classification")))
    labels = torch.tensor([2, 0, 1])
    weights = torch.tensor([0.5, 2.0, 1.0])
    logits = cls.scores(ids, attention_mask=mask)
    assert_close(cls.loss(ids, labels, attention_mask=mask, class_weights=weights),
                 F.cross_entropy(logits, labels, weight=weights))
    assert_close(cls.loss(ids, labels, attention_mask=mask, label_smoothing=0.1),
                 F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.equal(cls.predict(ids, attention_mask=mask), logits.argmax(-1))

    reg = _perturbed(build_head_model(preset("tiny-llama"), "sequence_classification",
                                      TaskHead(num_labels=1, output_scale=2.0, output_shift=3.0)))
    y = torch.tensor([1.0, 4.0, 6.5])
    out = reg.scores(ids, attention_mask=mask)[:, 0]
    assert_close(reg.loss(ids, y, attention_mask=mask), F.mse_loss(out, (y - 3.0) / 2.0))
    assert_close(reg.predict(ids, attention_mask=mask), out * 2.0 + 3.0)

    tok = _perturbed(build_head_model(preset("tiny-bert"), "token_classification", TaskHead(num_labels=4)))
    tags = torch.randint(0, 4, ids.shape).masked_fill(mask == 0, -100)
    tags[1, 2] = -100  # a sub-word continuation
    logits = tok.token_logits(ids, attention_mask=mask)
    assert_close(tok.loss(ids, tags, attention_mask=mask), F.cross_entropy(logits.reshape(-1, 4), tags.reshape(-1)))


def test_loader_names_a_truncated_file_and_a_wrong_dtype(tmp_path):
    model = build_model(preset("tiny-llama"))
    save_pretrained(model, tmp_path / "ok")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut'.*model.safetensors is truncated"):
        from_pretrained(tmp_path / "cut")
    state = {k: v for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    from safetensors.torch import save_file

    (tmp_path / "int").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "int" / "model.safetensors"))
    (tmp_path / "int" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    with pytest.raises(ValueError, match=r"'model.norm.weight': expected a floating-point tensor, got torch.int32"):
        from_pretrained(tmp_path / "int")
