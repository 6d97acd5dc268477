"""`HFTokenizer`: a Hugging Face `tokenizer.json` (the fast-tokenizer format every recent
checkpoint ships) through the optional `tokenizers` package, with fastllm's interface.

bos/eos/pad come from tokenizer_config.json / special_tokens_map.json beside the file when
present (their "bos_token", "eos_token", "pad_token" entries), else from well-known token
names found in the vocabulary. Special tokens are never added implicitly: encode adds bos/eos
only when asked (add_bos=/add_eos=), exactly as for the SentencePiece `Tokenizer`.
"""

from __future__ import annotations

import json
import os

from fastllm.tokenizer.base import TokenizerBase

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_UNK_NAMES = ("<unk>", "[UNK]")
_MASK_NAMES = ("<mask>", "[MASK]")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(
            "HFTokenizer needs the optional 'tokenizers' package: pip install tokenizers"
        ) from exc
    return tokenizers


def _token_content(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer(TokenizerBase):
    """Wraps a `tokenizers.Tokenizer` (see `TokenizerBase` for the interface).

    HFTokenizer.load(dir_or_tokenizer_json); tok.save(dir)
    bos_token / eos_token / pad_token: override the detected special tokens (strings).
    pad_id falls back to eos_id when the tokenizer has no pad token (padded positions are
    masked by the data pipeline, never compared against eos).
    """

    def __init__(
        self,
        tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        mask_token: str | None = None,
    ):
        tokenizers = _import_tokenizers()
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(
                f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self.tk = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._tokens = {}

        def pick(name: str, given: str | None, candidates) -> int | None:
            if given is not None:
                i = tokenizer.token_to_id(given)
                if i is None:
                    raise ValueError(f"{name}: {given!r} is not in the vocabulary")
                self._tokens[name] = given
                return int(i)
            for c in candidates:
                i = tokenizer.token_to_id(c)
                if i is not None:
                    self._tokens[name] = c
                    return int(i)
            return None

        self.bos_id = pick("bos_token", bos_token, _BOS_NAMES)
        self.eos_id = pick("eos_token", eos_token, _EOS_NAMES)
        self.unk_id = pick("unk_token", unk_token, _UNK_NAMES)
        self.mask_id = pick("mask_token", mask_token, _MASK_NAMES)
        pad = pick("pad_token", pad_token, _PAD_NAMES)
        self.pad_id = pad if pad is not None else self.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike, **special_tokens) -> HFTokenizer:
        """Load a directory holding tokenizer.json (and optionally tokenizer_config.json /
        special_tokens_map.json), or a tokenizer.json file itself."""
        tokenizers = _import_tokenizers()
        path = os.fspath(path)
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"path: no tokenizer.json at {file!r}")
        try:
            tk = tokenizers.Tokenizer.from_file(file)
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ValueError(f"path: {file!r} is not a Hugging Face tokenizer.json: {exc}") from exc
        found: dict[str, str] = {}
        for name in CONFIG_FILES:  # tokenizer_config.json wins over special_tokens_map.json
            cfg_path = os.path.join(os.path.dirname(file), name)
            if os.path.isfile(cfg_path):
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
                for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
                    content = _token_content(cfg.get(key))
                    if (
                        content is not None
                        and key not in found
                        and tk.token_to_id(content) is not None
                    ):
                        found[key] = content
        found.update({k: v for k, v in special_tokens.items() if v is not None})
        return cls(tk, **found)

    def save(self, directory: str | os.PathLike) -> str:
        """Write tokenizer.json and a tokenizer_config.json naming the special tokens."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.tk.save(os.path.join(directory, TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._tokens}
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        return directory

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def _decode_batch(self, rows: list[list[int]]) -> list[str]:
        return self.tk.decode_batch(rows, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        i = self.tk.token_to_id(token)
        return None if i is None else int(i)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id: expected an id in [0, {self.vocab_size}), got {token_id}")
        return self.tk.id_to_token(token_id)
