"""SentencePiece `Tokenizer`: training on the shipped corpus, exact round trips, special ids,
batch encode/decode, save/load, Llama-style tokenizer.model files, and bad input."""

import os
import time

import pytest
import sentencepiece as spm
import torch

from fastllm.data import load_corpus
from fastllm.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    MASK_TOKEN,
    Tokenizer,
    check_vocab_fits,
    format_chat,
    load_tokenizer,
)

UNICODE_TEXT = "naïve café — 漢字 🙂\n\ttabs  and   spaces \n"


def test_bpe_trains_on_shakespeare_under_a_minute():
    docs = load_corpus("shakespeare")
    start = time.perf_counter()
    tok = Tokenizer.train(docs, vocab_size=2000, model_type="bpe")
    elapsed = time.perf_counter() - start
    assert elapsed < 60.0, f"training took {elapsed:.1f} s"
    assert tok.vocab_size == 2000
    ids = tok.encode(docs)
    assert tok.decode(ids) == docs  # exact round trip of 1.5 MB of text
    n_chars = sum(len(d) for d in docs)
    n_tokens = sum(len(r) for r in ids)
    # Learned merges compress English well below one token per character.
    assert n_tokens < 0.4 * n_chars, (n_tokens, n_chars)


def test_unigram_trains_and_round_trips():
    docs = load_corpus("botchan")
    tok = Tokenizer.train(docs, vocab_size=800, model_type="unigram")
    assert tok.vocab_size == 800
    assert tok.decode(tok.encode(docs)) == docs
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_special_id_layout(botchan_tokenizer):
    tok = botchan_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.id_to_token(tok.mask_id) == MASK_TOKEN
    for marker in CHAT_SPECIAL_TOKENS:  # chat markers are single tokens
        assert tok.encode(marker)[-1] == tok.token_to_id(marker)
        assert tok.token_to_id(marker) is not None
    assert tok.token_to_id("no-such-piece-xyz") is None
    assert tok.special_ids == {0, 1, 2, 3, 4}


def test_round_trip_keeps_unicode_whitespace_and_chat_markers(botchan_tokenizer):
    tok = botchan_tokenizer
    _, text = format_chat(("Who is Botchan?", "A reckless young teacher."))
    for s in (UNICODE_TEXT, text, "", " leading space", "trailing  \n\n"):
        assert tok.decode(tok.encode(s)) == s


def test_batch_encode_matches_single_and_adds_bos_eos(botchan_tokenizer):
    tok = botchan_tokenizer
    texts = ["I went to Shikoku.", "", "Red Shirt talks in a feminine voice."]
    batch = tok.encode(texts, add_bos=True, add_eos=True)
    assert isinstance(batch, list) and len(batch) == 3
    for text, ids in zip(texts, batch, strict=True):
        single = tok.encode(text)
        assert ids == [tok.bos_id] + single + [tok.eos_id]
        assert all(isinstance(i, int) for i in ids)
    assert tok.encode(texts[0], add_bos=True)[0] == tok.bos_id
    assert tok.encode(texts[0], add_eos=True)[-1] == tok.eos_id
    assert tok.encode([]) == []
    # decode drops bos/eos/pad and accepts lists of lists and 1-D / 2-D tensors
    assert tok.decode(batch) == texts
    width = max(len(r) for r in batch) + 3
    padded = [r + [tok.pad_id] * (width - len(r)) for r in batch]
    assert tok.decode(torch.tensor(padded)) == texts
    assert tok.decode(torch.tensor(batch[0])) == texts[0]


def test_training_is_deterministic():
    docs = load_corpus("botchan")[:4]
    a = Tokenizer.train(docs, vocab_size=600)
    b = Tokenizer.train(docs, vocab_size=600)
    assert a.encode(docs) == b.encode(docs)


def test_train_from_a_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(load_corpus("botchan")[:3]), encoding="utf-8")
    tok = Tokenizer.train(str(path), vocab_size=600, out_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.model").is_file()
    assert Tokenizer.load(tmp_path / "tok").encode("Botchan") == tok.encode("Botchan")


def test_save_load_round_trip(botchan_tokenizer, tmp_path):
    tok = botchan_tokenizer
    tok.save(tmp_path)
    for loaded in (
        Tokenizer.load(tmp_path),
        Tokenizer.load(tmp_path / "tokenizer.model"),
        load_tokenizer(tmp_path),
    ):
        assert isinstance(loaded, Tokenizer)
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.mask_id) == (1, 2, 3, 4)
        assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)


def _llama_style_model(tmp_path) -> str:
    """A tokenizer.model laid out like Llama's / Mistral's: unk 0, <s> 1, </s> 2, no pad
    piece, byte fallback, the default (nmt_nfkc) normalisation."""
    prefix = os.path.join(tmp_path, "llama")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(load_corpus("botchan", unit="paragraph")),
        model_prefix=prefix,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=2,
    )
    os.makedirs(os.path.join(tmp_path, "ckpt"))
    target = os.path.join(tmp_path, "ckpt", "tokenizer.model")
    os.replace(prefix + ".model", target)
    return target


def test_loads_llama_style_tokenizer_model(tmp_path):
    path = _llama_style_model(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=path)
    for tok in (
        Tokenizer.load(path),
        Tokenizer.load(os.path.dirname(path)),
        load_tokenizer(os.path.dirname(path)),
    ):
        assert tok.vocab_size == 700
        assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.pad_id == tok.unk_id  # no pad piece: padding uses unk, never eos
        assert tok.mask_id is None
        text = "I have been getting the worst of it since childhood."
        assert tok.encode(text, add_bos=True) == [1] + sp.encode(text)
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == sp.decode(
            sp.encode(text)
        )
    assert Tokenizer.load(path, pad_id=2).pad_id == 2


def test_decode_rejects_ids_outside_the_vocabulary(botchan_tokenizer):
    tok = botchan_tokenizer
    with pytest.raises(
        ValueError, match=r"ids: token id 800 at position 1 is outside the vocabulary \[0, 800\)"
    ):
        tok.decode([5, 800])
    with pytest.raises(ValueError, match=r"ids\[1\]: token id -100"):
        tok.decode([[5], [6, -100]])
    with pytest.raises(ValueError, match=r"ids: token id 9999"):
        tok.decode(torch.tensor([1, 9999]))
    with pytest.raises(TypeError, match="ids: expected integer token ids"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="my_ids"):
        tok.check_ids([1, 800], name="my_ids")
    with pytest.raises(ValueError, match="token_id"):
        tok.id_to_token(800)


def test_encode_rejects_non_text(botchan_tokenizer):
    with pytest.raises(TypeError, match="text: expected a str or a list of str"):
        botchan_tokenizer.encode(5)
    with pytest.raises(TypeError, match="text: .*non-str"):
        botchan_tokenizer.encode(["ok", 3])


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="texts: the corpus is empty"):
        Tokenizer.train([], vocab_size=600)
    with pytest.raises(ValueError, match="texts: the corpus is empty"):
        Tokenizer.train(["", "  \n\n  "], vocab_size=600)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="texts: the corpus is empty"):
        Tokenizer.train(str(empty), vocab_size=600)
    with pytest.raises(FileNotFoundError, match="texts: "):
        Tokenizer.train("not a file.txt", vocab_size=600)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str"):
        Tokenizer.train(["fine", 7], vocab_size=600)
    with pytest.raises(ValueError, match="model_type: expected 'bpe' or 'unigram'"):
        Tokenizer.train(["some text"], vocab_size=600, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 265"):
        Tokenizer.train(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size: SentencePiece could not train"):
        Tokenizer.train(["a tiny corpus with few words"], vocab_size=5000)


def test_load_rejects_missing_or_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: "):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="path: .* is not a SentencePiece model"):
        Tokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="path: "):
        load_tokenizer(tmp_path / "nothing")


def test_check_vocab_fits(botchan_tokenizer):
    check_vocab_fits(botchan_tokenizer, 800)
    check_vocab_fits(botchan_tokenizer, 832)  # padded model vocabularies are fine
    with pytest.raises(
        ValueError, match="model_vocab: the model has 799 embeddings but the tokenizer"
    ):
        check_vocab_fits(botchan_tokenizer, 799, name="model_vocab")
