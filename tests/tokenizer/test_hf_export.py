"""A tokenizer saved by fastllm loads in transformers (`AutoTokenizer.from_pretrained`) and
gives fastllm's ids on varied text: whitespace runs, newlines, tabs, unicode through byte
fallback, digits, chat markers, for BPE and unigram models; fastllm still loads its own files."""

import json
import random

import pytest

from fastllm.data import load_corpus
from fastllm.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer, format_chat, load_tokenizer
from fastllm.tokenizer.hf_export import read_model_proto, tokenizer_json

transformers = pytest.importorskip("transformers")

FIXED_TEXTS = [
    "Hello world", "the", " the", "  leading spaces", "trailing  ", " ", "", "x  y   z", "a\nb\n\nc", "\n\nlead",
    "\ttab\t", "naïve café — 漢字 🙂\n\ttabs  and   spaces \n", "日本語 ü é ñ", "\u00a0nbsp\u200bzero-width",
    "12345 3.14 -0.5e10", "Botchan's  \"quote\"\r\n", "a" * 300, "<|user|>\nhi\n<|assistant|>\nyo",
    "x<|system|>y", format_chat(("Who is Botchan?", "A reckless young teacher."))[1],
]


def _texts():
    rng = random.Random(0)
    corpus = load_corpus("shakespeare")[0] + load_corpus("botchan")[0]
    samples = []
    for _ in range(60):
        i = rng.randrange(len(corpus) - 400)
        samples.append(corpus[i:i + rng.randrange(1, 400)])
    alphabet = "ab \n\t.,'日ü🙂<|>0123456789"
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(40)]
    return FIXED_TEXTS + samples


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def saved(request, tmp_path_factory):
    tok = Tokenizer.train(load_corpus("botchan"), vocab_size=800, model_type=request.param)
    path = tmp_path_factory.mktemp(f"tok_{request.param}")
    tok.save(path)
    return tok, path


def test_transformers_gives_fastllm_ids(saved):
    tok, path = saved
    hf = transformers.AutoTokenizer.from_pretrained(path)
    for text in _texts():
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True), repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text)


def test_special_ids_agree(saved):
    tok, path = saved
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, hf.mask_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id)
    assert len(hf) == tok.vocab_size
    for marker in CHAT_SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(marker) == tok.token_to_id(marker)
    batch = hf(["To be", "or not to be"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_id


def test_fastllm_loads_its_own_files(saved):
    tok, path = saved
    again = load_tokenizer(path)
    assert type(again) is Tokenizer  # not the tokenizer.json beside it
    assert (again.pad_id, again.mask_id, again.vocab_size) == (tok.pad_id, tok.mask_id, tok.vocab_size)
    text = "naïve café 🙂 <|user|>"
    assert again.encode(text) == tok.encode(text)


def test_older_config_still_loads(saved, tmp_path):
    tok, path = saved
    (tmp_path / "tokenizer.model").write_bytes((path / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "sentencepiece", "pad_id": 0}))
    assert load_tokenizer(tmp_path).pad_id == 0


def test_model_proto_reader_matches_sentencepiece(saved):
    tok, _ = saved
    spec = read_model_proto(tok._proto)
    assert len(spec["pieces"]) == tok.vocab_size
    for i, (piece, score, _) in enumerate(spec["pieces"]):
        assert piece == tok.sp.id_to_piece(i)
        assert score == pytest.approx(tok.sp.get_score(i))
    assert spec["normalizer"] == "identity" and spec["add_dummy_prefix"]


def test_unsupported_normaliser_is_named(saved):
    tok, _ = saved
    proto = tok._proto.replace(b"identity", b"nmt_nfkc")  # same length-prefixed field, other name
    with pytest.raises(ValueError, match="normaliser 'nmt_nfkc'"):
        tokenizer_json(proto, "<s>")
