"""Tokenizers with one interface (`TokenizerBase`): SentencePiece models trained here or
loaded from a Llama/Mistral `tokenizer.model` (`Tokenizer`), Hugging Face `tokenizer.json`
files through the optional `tokenizers` package (`HFTokenizer`), and the chat template.

    tok = Tokenizer.train(fastllm.data.load_corpus("shakespeare"), vocab_size=1000)
    ids = tok.encode(["To be", "or not"], add_bos=True, add_eos=True)   # list[list[int]]
    tok.decode(ids[0]); tok.save("out/tok"); tok = load_tokenizer("out/tok")
    prompt_text, full_text = format_chat(("What is 2+2?", "4"))
"""

from __future__ import annotations

import json
import os

from fastllm.tokenizer.base import TokenizerBase, check_token_ids, check_vocab_fits
from fastllm.tokenizer.chat import (
    ASSISTANT_TOKEN,
    CHAT_SPECIAL_TOKENS,
    SYSTEM_TOKEN,
    USER_TOKEN,
    format_chat,
    format_prompt,
)
from fastllm.tokenizer.hf_tokenizer import HFTokenizer
from fastllm.tokenizer.sentencepiece_tokenizer import FASTLLM_KEY, MASK_TOKEN, Tokenizer


def load_tokenizer(path: str | os.PathLike, **kwargs) -> TokenizerBase:
    """Load whichever tokenizer `path` holds: a directory with tokenizer.json (Hugging Face,
    preferred when both exist, except in a folder fastllm's `Tokenizer.save` wrote, whose
    tokenizer.json is the export of its tokenizer.model) or tokenizer.model (SentencePiece), or
    either file itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if _written_by_fastllm(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
            return Tokenizer.load(path, **kwargs)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.load(path, **kwargs)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return Tokenizer.load(path, **kwargs)
        raise FileNotFoundError(f"path: {path!r} holds neither tokenizer.json nor tokenizer.model")
    if path.endswith(".json"):
        return HFTokenizer.load(path, **kwargs)
    if os.path.isfile(path):
        return Tokenizer.load(path, **kwargs)
    raise FileNotFoundError(f"path: {path!r} does not exist")


def _written_by_fastllm(directory: str) -> bool:
    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"path: {config!r} is not valid JSON: {exc}") from None
    return isinstance(data, dict) and isinstance(data.get(FASTLLM_KEY), dict)


__all__ = [
    "ASSISTANT_TOKEN",
    "CHAT_SPECIAL_TOKENS",
    "HFTokenizer",
    "MASK_TOKEN",
    "SYSTEM_TOKEN",
    "Tokenizer",
    "TokenizerBase",
    "USER_TOKEN",
    "check_token_ids",
    "check_vocab_fits",
    "format_chat",
    "format_prompt",
    "load_tokenizer",
]
