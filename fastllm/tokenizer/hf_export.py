"""A SentencePiece model written as a Hugging Face `tokenizer.json`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` gives the ids fastllm gives.

SentencePiece encodes in three steps that map one-to-one onto a `tokenizers` pipeline:

- identity normalisation, a dummy "▁" before the text, spaces written as "▁": the normalizer
  `Prepend("▁")` + `Replace(" ", "▁")`;
- user-defined pieces (`<|user|>`, ...) matched anywhere in the text: a `Split` pre-tokenizer
  isolating them, and the BPE model takes a word that is a whole piece as is (`ignore_merges`);
- BPE (merge the pair whose merged piece scores highest) or unigram (Viterbi on the scores),
  with byte fallback: `BPE` with merges ranked by the merged piece's score, or `Unigram` with
  the scores, `byte_fallback: true` in both.

Special pieces (`<unk>`, `<s>`, `</s>`, `<pad>`, and `<mask>`, which transformers makes special
because tokenizer_config.json names it `mask_token`) are added tokens that transformers
matches in the raw text and normalises the text around them separately, where SentencePiece
spells "<s>" out character by character and matches "<mask>" after the dummy prefix. Text that
contains these strings literally is the one place the two differ; ids built the usual way
(bos/eos/pad/mask inserted as ids) agree. `encode(text)` in transformers adds bos in front
(Llama's convention, a post-processor), so `hf(text)["input_ids"] == tok.encode(text,
add_bos=True)`; with `add_special_tokens=False` it equals `tok.encode(text)`.

The model file is read with a small protobuf wire-format reader (no protobuf dependency): only
the pieces, the model type and the normaliser fields are needed.
"""

from __future__ import annotations

import json
import re
import struct

# ModelProto field numbers (sentencepiece_model.proto)
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
_PIECE, _SCORE, _TYPE = 1, 2, 3
_MODEL_TYPE = 3  # TrainerSpec
_NORM_NAME, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WS, _ESCAPE_WS = 1, 3, 4, 5  # NormalizerSpec
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited,
    floats for 32-bit fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"model_proto: unsupported protobuf wire type {wire} at byte {i}")
        yield number, value


def read_model_proto(proto: bytes) -> dict:
    """{"pieces": [(piece, score, type)], "model_type", "normalizer", "add_dummy_prefix",
    "remove_extra_whitespaces", "escape_whitespaces"} of a SentencePiece model file."""
    pieces, model_type = [], UNIGRAM
    norm = {"name": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
            "escape_whitespaces": True}
    for number, value in _fields(proto):
        if number == _PIECES:
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == _PIECE:
                    piece = v.decode("utf-8")
                elif n == _SCORE:
                    score = v
                elif n == _TYPE:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == _TRAINER_SPEC:
            for n, v in _fields(value):
                if n == _MODEL_TYPE:
                    model_type = v
        elif number == _NORMALIZER_SPEC:
            for n, v in _fields(value):
                if n == _NORM_NAME:
                    norm["name"] = v.decode("utf-8")
                elif n == _ADD_DUMMY_PREFIX:
                    norm["add_dummy_prefix"] = bool(v)
                elif n == _REMOVE_EXTRA_WS:
                    norm["remove_extra_whitespaces"] = bool(v)
                elif n == _ESCAPE_WS:
                    norm["escape_whitespaces"] = bool(v)
    return {"pieces": pieces, "model_type": model_type, "normalizer": norm["name"], **{
        k: norm[k] for k in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")}}


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """Every split of a vocabulary piece into two vocabulary pieces, ranked as SentencePiece's
    BPE applies them: the merged piece's score (higher first), then its id, then the left part's id."""
    vocab = {p: i for i, (p, _, kind) in enumerate(pieces) if kind in (NORMAL, USER_DEFINED, BYTE)}
    ranked = []
    for piece, merged_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-pieces[merged_id][1], merged_id, vocab[left], [left, right]))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked]


def supported(proto: bytes) -> str | None:
    """None when `tokenizer_json` reproduces this model exactly, else why not."""
    spec = read_model_proto(proto)
    if spec["model_type"] not in (BPE, UNIGRAM):
        return f"model type {spec['model_type']} (only BPE and unigram are exported)"
    if spec["normalizer"] != "identity" or spec["remove_extra_whitespaces"] or not spec["escape_whitespaces"]:
        return (f"normaliser {spec['normalizer']!r} (remove_extra_whitespaces={spec['remove_extra_whitespaces']}); "
                "only identity normalisation is exported")
    return None


def tokenizer_json(proto: bytes, bos_token: str | None) -> dict:
    """The tokenizer.json of a SentencePiece model (see the module docstring); raises
    ValueError naming what is not supported (`supported`)."""
    why = supported(proto)
    if why is not None:
        raise ValueError(f"model_proto: cannot be written as tokenizer.json: {why}")
    spec = read_model_proto(proto)
    pieces = spec["pieces"]
    unk_id = next((i for i, p in enumerate(pieces) if p[2] == UNKNOWN), None)
    added = []
    for i, (piece, _, kind) in enumerate(pieces):
        if kind in (UNKNOWN, CONTROL):
            added.append({"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
    normalizers = [{"type": "Prepend", "prepend": SPACE}] if spec["add_dummy_prefix"] else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    if spec["model_type"] == BPE:
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id][0] if unk_id is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": True,
                 "vocab": {p: i for i, (p, _, _) in enumerate(pieces)}, "merges": _bpe_merges(pieces)}
    else:
        model = {"type": "Unigram", "unk_id": unk_id, "byte_fallback": True,
                 "vocab": [[p, float(s)] for p, s, _ in pieces]}
    user = [re.escape(p) for p, _, kind in pieces if kind == USER_DEFINED]
    # longest first: the regex alternation takes the first that matches, SentencePiece the longest
    user.sort(key=len, reverse=True)
    pre_tokenizer = None
    if user:
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": "|".join(user)}, "behavior": "Isolated",
                         "invert": False}
    single, special = [{"Sequence": {"id": "A", "type_id": 0}}], {}
    if bos_token is not None:
        bos_id = next(i for i, p in enumerate(pieces) if p[0] == bos_token)
        single = [{"SpecialToken": {"id": bos_token, "type_id": 0}}] + single
        special = {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}}
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                               "special_tokens": special},
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": model}


def write_tokenizer_json(proto: bytes, bos_token: str | None) -> bytes:
    return (json.dumps(tokenizer_json(proto, bos_token), ensure_ascii=False) + "\n").encode("utf-8")
