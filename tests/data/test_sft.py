"""SFT and preference examples: exact prompt masking and shifted labels, truncation and
too-long handling, padded collation, and bad input."""

import pytest
import torch

from fastllm.data import (
    IGNORE_INDEX,
    PackedSFTDataset,
    PreferenceDataset,
    SFTDataset,
    build_sft_example,
    load_instructions,
    load_preferences,
)
from fastllm.tokenizer import format_prompt


def test_example_masks_the_prompt_and_shifts_labels(botchan_tokenizer):
    tok = botchan_tokenizer
    ex = build_sft_example(
        tok, ("Who is Red Shirt?", "The head teacher, who talks in a soft voice.")
    )
    ids, labels, p = ex["input_ids"], ex["labels"], ex["prompt_length"]
    # the prompt is exactly what a model sees at generation time
    assert ids[:p] == tok.encode(format_prompt("Who is Red Shirt?"), add_bos=True)
    assert ids[-1] == tok.eos_id
    assert len(labels) == len(ids)
    for t in range(len(ids)):
        if t < p - 1 or t == len(ids) - 1:
            assert labels[t] == IGNORE_INDEX, t
        else:
            assert labels[t] == ids[t + 1], t
    assert tok.decode(ids[p:]) == "The head teacher, who talks in a soft voice."


def test_multi_turn_trains_only_the_last_answer(botchan_tokenizer):
    tok = botchan_tokenizer
    conv = [
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "B?"},
        {"role": "assistant", "content": "second"},
    ]
    ex = build_sft_example(tok, conv, system="Be brief.")
    targets = [lab for lab in ex["labels"] if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "second"
    assert "first" in tok.decode(ex["input_ids"])


def test_too_long(botchan_tokenizer):
    tok = botchan_tokenizer
    conv = (
        "Tell me about the school.",
        "It is a middle school in Shikoku with many pupils and teachers. " * 4,
    )
    full = build_sft_example(tok, conv)
    n, p = len(full["input_ids"]), full["prompt_length"]
    with pytest.raises(
        ValueError,
        match=rf"max_length: the example has {n} tokens \(prompt {p}, response {n - p}\), "
        rf"more than max_length=20",
    ):
        build_sft_example(tok, conv, max_length=20)
    cut = build_sft_example(tok, conv, max_length=p + 5, truncate=True)
    assert cut["input_ids"] == full["input_ids"][: p + 5]
    assert cut["labels"][:-1] == full["labels"][: p + 4] and cut["labels"][-1] == IGNORE_INDEX
    with pytest.raises(ValueError, match=f"max_length: the prompt alone has {p} tokens"):
        build_sft_example(tok, conv, max_length=p, truncate=True)
    with pytest.raises(ValueError, match="max_length: expected an int >= 2"):
        build_sft_example(tok, conv, max_length=1)


def test_sft_dataset_and_collate(botchan_tokenizer):
    tok = botchan_tokenizer
    records = load_instructions()
    with pytest.raises(ValueError, match=r"records\[\d+\]: max_length: "):
        SFTDataset(records, tok, max_length=128)
    ds = SFTDataset(records, tok, max_length=128, too_long="skip")
    too_long = [
        i for i, r in enumerate(records) if len(build_sft_example(tok, r)["input_ids"]) > 128
    ]
    assert ds.skipped == too_long and len(ds) == len(records) - len(too_long)
    truncated = SFTDataset(records[:50], tok, max_length=32, too_long="truncate")
    assert max(len(truncated[i]["input_ids"]) for i in range(len(truncated))) == 32
    items = [ds[i] for i in (0, 5, 9)]
    batch = ds.collate(items)
    lens = [len(it["input_ids"]) for it in items]
    L = max(lens)
    assert batch["input_ids"].shape == (3, L) and batch["labels"].shape == (3, L)
    assert batch["lengths"].tolist() == lens
    for b, n in enumerate(lens):
        assert torch.equal(batch["input_ids"][b, :n], items[b]["input_ids"])
        assert (batch["input_ids"][b, n:] == tok.pad_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (L - n)
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
    # cu_seqlens over the flattened (B*L) layout: each row, then its padding as its own segment
    expected = [0]
    for b, n in enumerate(lens):
        expected += [b * L + n] + ([(b + 1) * L] if n < L else [])
    assert batch["cu_seqlens"].tolist() == expected
    assert batch["max_seqlen"] == L


def test_preference_dataset(botchan_tokenizer):
    tok = botchan_tokenizer
    prefs = load_preferences()[:40]
    ds = PreferenceDataset(prefs, tok, max_length=96, too_long="skip")
    assert len(ds) + len(ds.skipped) == 40
    kept = [i for i in range(40) if i not in ds.skipped]
    for k in (0, 1, 2):
        item, rec = ds[k], prefs[kept[k]]
        p = build_sft_example(tok, (rec["prompt"], rec["chosen"]))["prompt_length"]
        assert torch.equal(item["chosen_input_ids"][:p], item["rejected_input_ids"][:p])
        assert tok.decode(item["chosen_input_ids"][p:]) == rec["chosen"]
        assert tok.decode(item["rejected_input_ids"][p:]) == rec["rejected"]
    batch = ds.collate([ds[i] for i in range(4)])
    L = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape == (4, L)
    for side in ("chosen", "rejected"):
        last = batch[f"{side}_lengths"] - 1
        assert (batch[f"{side}_input_ids"][torch.arange(4), last] == tok.eos_id).all()
        assert L == max(batch["chosen_lengths"].max(), batch["rejected_lengths"].max())
    with pytest.raises(ValueError, match=r"records\[0\]: missing keys \['rejected'\]"):
        PreferenceDataset([{"prompt": "a", "chosen": "b"}], tok)


def test_bad_input(botchan_tokenizer):
    tok = botchan_tokenizer
    with pytest.raises(ValueError, match="records: empty dataset"):
        SFTDataset([], tok)
    with pytest.raises(ValueError, match="records: empty dataset"):
        PreferenceDataset([], tok)
    with pytest.raises(ValueError, match="too_long: expected one of"):
        SFTDataset([("a", "b")], tok, too_long="drop")
    with pytest.raises(ValueError, match=r"records\[1\]: conversation"):
        SFTDataset([("a", "b"), [{"role": "user", "content": "only a question"}]], tok)
    with pytest.raises(ValueError, match="max_length: all 1 records are longer than max_length=4"):
        SFTDataset([("a question", "an answer")], tok, max_length=4, too_long="skip")


def test_packed_sft_blocks(botchan_tokenizer):
    tok = botchan_tokenizer
    sft = SFTDataset(load_instructions()[:60], tok, max_length=64, too_long="skip")
    packed = PackedSFTDataset(sft, 128)
    seen = []
    for b in range(len(packed)):
        item = packed[b]
        cu = item["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == 128
        members = packed.blocks[b]
        for j, i in enumerate(members):  # each example is one segment, copied verbatim
            s, e = cu[j], cu[j + 1]
            assert item["input_ids"][s:e].tolist() == sft.examples[i]["input_ids"]
            assert item["labels"][s:e].tolist() == sft.examples[i]["labels"]
            assert item["position_ids"][s:e].tolist() == list(range(e - s))
        if len(cu) - 1 > len(members):  # trailing padding segment
            s = cu[len(members)]
            assert (item["input_ids"][s:] == tok.pad_id).all()
            assert (item["labels"][s:] == IGNORE_INDEX).all()
        # greedy in order: the next example would not have fitted
        if b + 1 < len(packed):
            nxt = len(sft.examples[packed.blocks[b + 1][0]]["input_ids"])
            assert cu[len(members)] + nxt > 128
        seen += members
    assert seen == list(range(len(sft)))  # every example once, order kept
    batch = packed.collate([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 128) and batch["cu_seqlens"][-1] == 256
    with pytest.raises(
        ValueError, match=r"block_size: examples\[\d+\] has \d+ tokens, more than block_size=16"
    ):
        PackedSFTDataset(sft, 16)
    with pytest.raises(ValueError, match="pad_id: required"):
        PackedSFTDataset(sft.examples, 128)
    with pytest.raises(ValueError, match=r"examples\[0\]: input_ids has 2 tokens but labels has 1"):
        PackedSFTDataset([{"input_ids": [1, 2], "labels": [5]}], 8, pad_id=0)
    with pytest.raises(ValueError, match="examples: empty dataset"):
        PackedSFTDataset([], 8, pad_id=0)
