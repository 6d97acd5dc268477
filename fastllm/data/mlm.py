"""Masked-LM inputs (BERT, Devlin et al. 2019, section 3.1): 15% of the tokens are chosen
for prediction; of those 80% become the mask token, 10% a random token and 10% stay as they
are. Labels are aligned with positions: labels[t] = the original token where chosen, -100
elsewhere (no shift, the encoder predicts the token at its own position)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fastllm.data.packing import IGNORE_INDEX


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    special_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (..., T) int64 -> (masked_input_ids, labels), both (..., T) int64.

    Tokens in special_ids (bos, eos, pad, ...) are never chosen. Every row with at least one
    maskable token gets at least one chosen token, so no row has an empty loss. Random
    replacement tokens are drawn uniformly from the non-special ids.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids: expected an int64 tensor, got {got}")
    if input_ids.dim() == 0:
        raise ValueError("input_ids: expected at least 1 dimension, got a scalar")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob: expected a value in (0, 1), got {mask_prob}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id: expected an id in [0, vocab_size={vocab_size}), got {mask_id}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise ValueError(
            f"input_ids: token id {int(bad)} is outside the vocabulary [0, {vocab_size})"
        )
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=torch.long)
    maskable = ~torch.isin(input_ids, special)
    shape = input_ids.shape
    chosen = (torch.rand(shape, generator=generator) < mask_prob) & maskable
    # Rows where nothing was chosen: choose one maskable token at random.
    rows = chosen.reshape(-1, shape[-1])
    able = maskable.reshape(-1, shape[-1])
    empty = ~rows.any(-1) & able.any(-1)
    if bool(empty.any()):
        scores = torch.rand(able.shape, generator=generator).masked_fill(~able, -1.0)
        pick = scores.argmax(-1)
        idx = empty.nonzero().flatten()
        rows[idx, pick[idx]] = True
    chosen = rows.reshape(shape)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    r = torch.rand(shape, generator=generator)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    pool = allowed.nonzero().flatten()
    if pool.numel() == 0:
        raise ValueError(
            "special_ids: every id of the vocabulary is special; nothing to draw random tokens from"
        )
    random_ids = pool[torch.randint(pool.numel(), shape, generator=generator)]
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


class MLMDataset:
    """Masked-LM view of a dataset whose items have "input_ids" (e.g. a PackedDataset, whose
    position_ids / cu_seqlens keep bidirectional attention inside documents).

    Masks are a pure function of (seed, epoch, index), so a resumed run sees the same masks;
    `set_epoch` (called by BatchLoader) gives fresh masks every epoch (dynamic masking).
    item -> the base item with input_ids masked and labels replaced by the MLM labels.
    """

    def __init__(
        self,
        base,
        *,
        mask_id: int,
        vocab_size: int,
        special_ids: Iterable[int] = (),
        mask_prob: float = 0.15,
        seed: int = 0,
    ):
        if len(base) == 0:
            raise ValueError("base: empty dataset")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(
                f"mask_id: expected an id in [0, vocab_size={vocab_size}), got {mask_id}"
            )
        self.base = base
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = tuple(special_ids)
        self.mask_prob = mask_prob
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_tokenizer(cls, base, tokenizer, **kwargs) -> MLMDataset:
        if tokenizer.mask_id is None:
            raise ValueError(
                "tokenizer: has no mask token (train one with Tokenizer.train, "
                "which adds <mask>, or pass mask_id= to MLMDataset)"
            )
        return cls(
            base,
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % (1 << 63)
        g = torch.Generator().manual_seed(seed)
        item["input_ids"], item["labels"] = mask_tokens(
            item["input_ids"],
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            mask_prob=self.mask_prob,
            special_ids=self.special_ids,
            generator=g,
        )
        return item

    def collate(self, items: list[dict]) -> dict:
        collate = getattr(self.base, "collate", None)
        if collate is None:
            from fastllm.data.loader import default_collate

            return default_collate(items)
        return collate(items)
