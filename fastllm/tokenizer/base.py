"""What every fastllm tokenizer shares: the public interface, batch handling, bos/eos
insertion and id validation. The subclasses (SentencePiece, Hugging Face `tokenizers`) only
say how to turn one batch of strings into ids and back."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

TextInput = str | Sequence[str]


def _as_id_lists(ids: Any, name: str = "ids") -> tuple[list[list[int]], bool]:
    """ids (list[int] | list[list[int]] | list of 1-D tensors | 1-D/2-D tensor or array)
    -> (rows, was_batched)."""
    if hasattr(ids, "tolist") and not isinstance(ids, list):  # torch.Tensor, numpy array
        if getattr(ids, "ndim", 1) > 2:
            raise ValueError(f"{name}: expected a 1-D or 2-D tensor, got {ids.ndim} dimensions")
        ids = ids.tolist()
        if isinstance(ids, int):  # a 0-d tensor
            ids = [ids]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(
            f"{name}: expected a list of token ids (or a list of lists), got {type(ids).__name__}"
        )
    rows = [r.tolist() if hasattr(r, "tolist") and getattr(r, "ndim", 0) >= 1 else r for r in ids]
    if rows and isinstance(rows[0], (list, tuple)):
        return [list(r) for r in rows], True
    return [list(ids)], False


def check_token_ids(ids: Sequence[int], vocab_size: int, name: str = "ids") -> None:
    """Raise (TypeError or) ValueError naming `name` if any id is not an integer in
    [0, vocab_size)."""
    for pos, i in enumerate(ids):
        try:
            v = operator.index(i)
        except TypeError:
            raise TypeError(
                f"{name}: expected integer token ids, got {type(i).__name__} at position {pos}"
            ) from None
        if not 0 <= v < vocab_size:
            raise ValueError(
                f"{name}: token id {v} at position {pos} is outside the "
                f"vocabulary [0, {vocab_size})"
            )


def check_vocab_fits(tokenizer, vocab_size: int, name: str = "vocab_size") -> None:
    """Raise ValueError naming `name` when a model's embedding (vocab_size rows) cannot hold
    every id the tokenizer produces. A larger model vocabulary is fine (checkpoints often
    pad it to a multiple of 64)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{name}: the model has {vocab_size} embeddings but the tokenizer produces ids up to "
            f"{tokenizer.vocab_size - 1} (vocab_size {tokenizer.vocab_size})"
        )


class TokenizerBase:
    """Interface shared by `Tokenizer` (SentencePiece) and `HFTokenizer`.

    encode(text | list[str], add_bos=False, add_eos=False) -> list[int] | list[list[int]]
    decode(ids | list of ids | tensor) -> str | list[str]      (special tokens are dropped)
    vocab_size, bos_id, eos_id, pad_id, unk_id, mask_id (None where the vocabulary lacks one)
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None = None
    mask_id: int | None = None

    # --- subclass hooks -------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_batch(self, rows: list[list[int]]) -> list[str]:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    # --- public ---------------------------------------------------------------------
    def encode(self, text: TextInput, add_bos: bool = False, add_eos: bool = False):
        """Text -> token ids. A str gives list[int]; a list of str gives list[list[int]]
        (encoded in one batch call). add_bos / add_eos wrap every sequence."""
        if isinstance(text, str):
            texts, batched = [text], False
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts, batched = list(text), True
        else:
            raise TypeError(
                f"text: expected a str or a list of str, got {type(text).__name__}"
                + ("" if not isinstance(text, (list, tuple)) else " with non-str items")
            )
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos: this tokenizer has no bos token")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos: this tokenizer has no eos token")
        rows = self._encode_batch(texts) if texts else []
        pre = [self.bos_id] if add_bos else []
        post = [self.eos_id] if add_eos else []
        rows = [pre + r + post for r in rows]
        return rows if batched else rows[0]

    def decode(self, ids):
        """Token ids -> text. list[int] or a 1-D tensor gives a str; a list of lists or a
        2-D tensor gives list[str]. Ids outside [0, vocab_size) raise ValueError."""
        rows, batched = _as_id_lists(ids, "ids")
        for b, r in enumerate(rows):
            check_token_ids(r, self.vocab_size, f"ids[{b}]" if batched else "ids")
        out = self._decode_batch([[int(i) for i in r] for r in rows])
        return out if batched else out[0]

    def check_ids(self, ids, name: str = "ids") -> None:
        """Raise ValueError naming `name` if any id lies outside the vocabulary."""
        rows, batched = _as_id_lists(ids, name)
        for b, r in enumerate(rows):
            check_token_ids(r, self.vocab_size, f"{name}[{b}]" if batched else name)

    @property
    def special_ids(self) -> set[int]:
        """Ids of bos/eos/pad/unk/mask that exist in this vocabulary."""
        return {
            i
            for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.mask_id)
            if i is not None
        }

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
