"""PromptDataset: generation prompts from every record form, left padding, bad input."""

import pytest
import torch

from fastllm.data import PromptDataset, load_instructions, load_preferences
from fastllm.tokenizer import format_prompt


def test_prompts_from_every_record_form(botchan_tokenizer):
    tok = botchan_tokenizer
    want = tok.encode(format_prompt("Who is Botchan?"), add_bos=True)
    records = [
        "Who is Botchan?",
        [{"role": "user", "content": "Who is Botchan?"}],
        {"prompt": "Who is Botchan?", "chosen": "x", "rejected": "y"},
        {
            "messages": [
                {"role": "user", "content": "Who is Botchan?"},
                {"role": "assistant", "content": "dropped"},
            ]
        },
    ]
    ds = PromptDataset(records, tok)
    for i in range(len(records)):
        assert ds[i]["input_ids"].tolist() == want
    instr = load_instructions()[:5]
    ds = PromptDataset(instr, tok)
    assert tok.decode(ds[0]["input_ids"]) == format_prompt(instr[0]["messages"][:-1])
    assert len(PromptDataset(load_preferences()[:7], tok)) == 7


def test_left_padding(botchan_tokenizer):
    tok = botchan_tokenizer
    ds = PromptDataset(["Hi?", "A much longer question about the school and the town?"], tok)
    batch = ds.collate([ds[0], ds[1]])
    lens = batch["lengths"].tolist()
    P = max(lens)
    assert batch["input_ids"].shape == (2, P)
    for b, n in enumerate(lens):
        assert torch.equal(batch["input_ids"][b, P - n :], ds[b]["input_ids"])
        assert (batch["input_ids"][b, : P - n] == tok.pad_id).all()
        assert batch["attention_mask"][b].tolist() == [False] * (P - n) + [True] * n
        assert batch["position_ids"][b].tolist() == [0] * (P - n) + list(range(n))
    # every prompt ends with the assistant header in the last column
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()


def test_bad_input(botchan_tokenizer):
    tok = botchan_tokenizer
    with pytest.raises(ValueError, match="records: empty dataset"):
        PromptDataset([], tok)
    with pytest.raises(
        ValueError, match=r"records\[1\]: max_prompt_length: the prompt has \d+ tokens"
    ):
        PromptDataset(["a", "a long question " * 20], tok, max_prompt_length=20)
    ds = PromptDataset(
        ["a", "a long question " * 20], tok, max_prompt_length=20, skip_too_long=True
    )
    assert len(ds) == 1 and ds.skipped == [1]
    with pytest.raises(ValueError, match=r"records\[0\]: .*the last message must have role 'user'"):
        PromptDataset(
            [
                [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            ],
            tok,
        )
    with pytest.raises(
        ValueError, match=r"records\[0\]: a dict needs a 'prompt' or 'messages' key"
    ):
        PromptDataset([{"question": "q"}], tok)
