"""HFTokenizer: a tokenizer.json trained with the `tokenizers` package (byte-level BPE, as
GPT-2/Llama-3 style checkpoints ship), loaded with its special tokens from
tokenizer_config.json, and the clear error when `tokenizers` is missing."""

import json
import sys

import pytest
import torch

from fastllm.data import build_sft_example, load_corpus
from fastllm.tokenizer import HFTokenizer, load_tokenizer

TEXT = "Because of an hereditary recklessness, I have been playing always a losing game. 漢字 🙂"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(load_corpus("botchan", unit="paragraph"), trainer=trainer)
    d = tmp_path_factory.mktemp("hf")
    tk.save(str(d / "tokenizer.json"))
    # The two spellings checkpoints use: a plain string and an AddedToken-like dict.
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|begin_of_text|>", "special": True},
                "eos_token": "<|end_of_text|>",
                "pad_token": None,
            }
        )
    )
    return d


def test_loads_with_special_tokens_from_config(hf_dir):
    for tok in (
        HFTokenizer.load(hf_dir),
        HFTokenizer.load(hf_dir / "tokenizer.json"),
        load_tokenizer(hf_dir),
    ):
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == 600
        assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") == 0
        assert tok.eos_id == tok.token_to_id("<|end_of_text|>") == 1
        assert tok.pad_id == tok.token_to_id("<|pad|>") == 2  # found by name
        assert tok.mask_id is None


def test_encode_decode_round_trip_and_special_tokens(hf_dir):
    tok = HFTokenizer.load(hf_dir)
    ids = tok.encode(TEXT)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # never added implicitly
    assert tok.decode(ids) == TEXT
    batch = tok.encode([TEXT, "", "Red Shirt"], add_bos=True, add_eos=True)
    assert batch[0] == [tok.bos_id] + ids + [tok.eos_id]
    assert batch[1] == [tok.bos_id, tok.eos_id]
    assert tok.decode(batch) == [TEXT, "", "Red Shirt"]  # special tokens are dropped
    assert tok.decode(torch.tensor(batch[2])) == "Red Shirt"


def test_rejects_ids_outside_the_vocabulary(hf_dir):
    tok = HFTokenizer.load(hf_dir)
    with pytest.raises(
        ValueError, match=r"ids: token id 600 at position 0 is outside the vocabulary \[0, 600\)"
    ):
        tok.decode([600])
    with pytest.raises(ValueError, match=r"ids: token id -1"):
        tok.decode(torch.tensor([3, -1]))


def test_overrides_and_save_load(hf_dir, tmp_path):
    tok = HFTokenizer.load(hf_dir, eos_token="<|pad|>", pad_token="<|end_of_text|>")
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    tok.save(tmp_path)
    again = HFTokenizer.load(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id) == (0, 2, 1)
    assert again.encode(TEXT) == tok.encode(TEXT)
    with pytest.raises(ValueError, match="eos_token: '<nope>' is not in the vocabulary"):
        HFTokenizer.load(hf_dir, eos_token="<nope>")


def test_sft_example_with_hf_tokenizer(hf_dir):
    tok = HFTokenizer.load(hf_dir)
    ex = build_sft_example(tok, ("Who teaches mathematics?", "Botchan does."))
    ids, labels, p = ex["input_ids"], ex["labels"], ex["prompt_length"]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(lab == -100 for lab in labels[: p - 1])
    assert labels[p - 1 : -1] == ids[p:]
    assert tok.decode(ids[p:]) == "Botchan does."


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no tokenizer.json"):
        HFTokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="path: .* is not a Hugging Face tokenizer.json"):
        HFTokenizer.load(bad)


def test_missing_tokenizers_package_gives_a_clear_error(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer.load(hf_dir)
