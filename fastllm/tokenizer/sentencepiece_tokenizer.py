"""`Tokenizer`: a SentencePiece model (BPE or unigram) - trained here on any corpus, or
loaded from an existing `tokenizer.model` (Llama / Mistral style).

Models trained by `Tokenizer.train` use the Llama layout for the first ids - 0 <unk>,
1 <s> (bos), 2 </s> (eos) - then 3 <pad>, then the user-defined pieces <mask>, <|system|>,
<|user|>, <|assistant|> (single tokens). Text is kept as written (identity normalisation,
whitespace and newlines preserved) and byte fallback is on, so decode(encode(text)) == text
for any text: characters the model has never seen become their UTF-8 bytes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

import sentencepiece as spm

from fastllm.tokenizer import hf_export
from fastllm.tokenizer.base import TokenizerBase
from fastllm.tokenizer.chat import CHAT_SPECIAL_TOKENS

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
FASTLLM_KEY = "fastllm"  # tokenizer_config.json entry holding fastllm's own ids
MASK_TOKEN = "<mask>"
DEFAULT_USER_SYMBOLS = (MASK_TOKEN,) + CHAT_SPECIAL_TOKENS
# SentencePiece trains on "sentences"; we feed paragraphs (they keep their newlines) and cut
# anything longer at line breaks so no input is silently dropped by its length limit.
MAX_SENTENCE_BYTES = 8192


def _paragraphs(text: str) -> Iterable[str]:
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if len(para.encode("utf-8")) <= MAX_SENTENCE_BYTES:
            yield para
            continue
        chunk: list[str] = []
        size = 0
        for line in para.split("\n"):
            n = len(line.encode("utf-8")) + 1
            if chunk and size + n > MAX_SENTENCE_BYTES:
                yield "\n".join(chunk)
                chunk, size = [], 0
            # A single line longer than the limit is cut into pieces of whole characters.
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                cut = MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            chunk.append(line)
            size += len(line.encode("utf-8")) + 1
        if chunk and "".join(chunk).strip():
            yield "\n".join(chunk)


class Tokenizer(TokenizerBase):
    """A SentencePiece tokenizer with fastllm's interface (see `TokenizerBase`).

    Tokenizer.train(texts_or_path, vocab_size=1000, model_type="bpe", out_dir=None)
    Tokenizer.load(dir_or_model_file); tok.save(dir)
    pad_id: the model's pad piece if it has one, else `pad_id=` given here, else unk (Llama's
    tokenizer.model has no pad piece; padded positions are masked by the data pipeline, so any
    id works - unk is chosen so it never collides with eos).
    """

    def __init__(self, model_proto: bytes, pad_id: int | None = None):
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self.sp.get_piece_size())

        def opt(i: int) -> int | None:
            return int(i) if i >= 0 else None

        self.bos_id = opt(self.sp.bos_id())
        self.eos_id = opt(self.sp.eos_id())
        self.unk_id = opt(self.sp.unk_id())
        mask = self.sp.piece_to_id(MASK_TOKEN)
        self.mask_id = mask if mask != self.sp.unk_id() else None
        if pad_id is not None:
            if not 0 <= pad_id < self.vocab_size:
                raise ValueError(f"pad_id: expected an id in [0, {self.vocab_size}), got {pad_id}")
            self.pad_id = int(pad_id)
        else:
            self.pad_id = opt(self.sp.pad_id())
            if self.pad_id is None:
                self.pad_id = self.unk_id if self.unk_id is not None else self.eos_id

    # --- training -------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: str | os.PathLike | Iterable[str],
        vocab_size: int = 1000,
        model_type: str = "bpe",
        out_dir: str | os.PathLike | None = None,
        *,
        user_symbols: Iterable[str] = DEFAULT_USER_SYMBOLS,
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Train a BPE or unigram model.

        texts: a path to a UTF-8 text file (str or PathLike naming an existing file), or an
            iterable of documents (str). Documents are split into paragraphs at blank lines.
        vocab_size: total pieces, including the 4 control pieces, the user symbols and (with
            byte_fallback) 256 byte pieces.
        model_type: "bpe" or "unigram".
        out_dir: when given, the model is saved there (`save`).
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
        if isinstance(texts, (str, os.PathLike)) and os.path.isfile(texts):
            with open(texts, encoding="utf-8") as f:
                docs: Iterable[str] = [f.read()]
        elif isinstance(texts, (str, os.PathLike)):
            raise FileNotFoundError(
                f"texts: a str is read as a path to a text file, and "
                f"{os.fspath(texts)!r} is not a file (pass a list of documents "
                f"to train on strings)"
            )
        else:
            docs = texts
        sentences = []
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(doc).__name__}")
            sentences.extend(_paragraphs(doc))
        if not sentences:
            raise ValueError("texts: the corpus is empty (no non-blank text to train on)")
        user_symbols = list(user_symbols)
        minimum = 4 + len(user_symbols) + (256 if byte_fallback else 0) + 1
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"vocab_size: expected an int >= {minimum} (4 control pieces, "
                f"{len(user_symbols)} user symbols"
                f"{', 256 byte pieces' if byte_fallback else ''} and at least one "
                f"more), got {vocab_size!r}"
            )
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_digits=True,
                max_sentence_length=MAX_SENTENCE_BYTES * 2,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                user_defined_symbols=user_symbols,
                num_threads=num_threads or min(8, os.cpu_count() or 1),
                minloglevel=2,
            )
        except RuntimeError as exc:
            # e.g. "Vocabulary size too high (5000). Please set it to a value <= 1234."
            raise ValueError(
                f"vocab_size: SentencePiece could not train a {vocab_size}-piece "
                f"{model_type} model on this corpus: {exc}"
            ) from exc
        tok = cls(model.getvalue())
        if out_dir is not None:
            tok.save(out_dir)
        return tok

    # --- files ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str:
        """Write `tokenizer.model` (what fastllm loads), and for transformers `tokenizer.json`
        (the same tokenization as a fast tokenizer, `hf_export`), `tokenizer_config.json` and
        `special_tokens_map.json`; return directory. `AutoTokenizer.from_pretrained(directory)`
        then gives fastllm's ids: `hf(text)["input_ids"] == encode(text, add_bos=True)`. A model
        that `hf_export` cannot reproduce exactly (non-identity normalisation) gets no
        tokenizer.json; transformers then converts tokenizer.model itself (`LlamaTokenizer`)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        _atomic_write(os.path.join(directory, MODEL_FILE), self._proto)
        exact = hf_export.supported(self._proto) is None
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
                 "pad_token": self.pad_id, "mask_token": self.mask_id}
        special = {k: self.sp.id_to_piece(i) for k, i in names.items() if i is not None}
        if exact:
            _atomic_write(os.path.join(directory, HF_FILE),
                          hf_export.write_tokenizer_json(self._proto, special.get("bos_token")))
        elif os.path.exists(os.path.join(directory, HF_FILE)):
            os.remove(os.path.join(directory, HF_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast" if exact else "LlamaTokenizer",
            **special,
            "add_bos_token": self.bos_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            # what fastllm reads back (`load`): its own ids, kept beside the transformers fields
            FASTLLM_KEY: {"kind": "sentencepiece", "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                          "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id,
                          "mask_id": self.mask_id},
        }
        for name, data in ((CONFIG_FILE, config), (SPECIAL_TOKENS_FILE, special)):
            _atomic_write(os.path.join(directory, name), (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, pad_id: int | None = None) -> Tokenizer:
        """Load a directory holding `tokenizer.model` (and optionally our
        tokenizer_config.json, whose pad_id is used), or a `.model` file itself."""
        path = os.fspath(path)
        model_path = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"path: no SentencePiece model at {model_path!r}")
        config_path = os.path.join(os.path.dirname(model_path), CONFIG_FILE)
        if pad_id is None and os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            if isinstance(config.get(FASTLLM_KEY), dict):
                pad_id = config[FASTLLM_KEY].get("pad_id")
            elif config.get("tokenizer_class") == "sentencepiece":  # files written before tokenizer.json export
                pad_id = config.get("pad_id")
        with open(model_path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, pad_id=pad_id)
        except RuntimeError as exc:
            raise ValueError(f"path: {model_path!r} is not a SentencePiece model: {exc}") from exc

    # --- encode / decode ------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def _decode_batch(self, rows: list[list[int]]) -> list[str]:
        return self.sp.decode(rows)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else int(i)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id: expected an id in [0, {self.vocab_size}), got {token_id}")
        return self.sp.id_to_piece(token_id)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
