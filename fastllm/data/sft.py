"""Instruction (SFT) and preference examples: the chat template rendered, tokenized, and
labelled so that only the response is trained on.

An example is  [bos] + encode(prompt_text) + encode(response) + [eos]. The prompt and the
response are encoded separately, so the prompt's tokens are exactly those a model sees at
generation time (encode(format_prompt(...)), with bos) and the boundary is exact for any
tokenizer. Labels are aligned with positions, already shifted: labels[t] = input_ids[t+1]
where that token belongs to the response (its eos included), -100 elsewhere; the last
position has no target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastllm.data.packing import IGNORE_INDEX
from fastllm.tokenizer.chat import format_chat


def build_sft_example(
    tokenizer,
    conversation: Any,
    max_length: int | None = None,
    *,
    system: str | None = None,
    truncate: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """One training example: {"input_ids": list[int], "labels": list[int], "prompt_length": int}.

    conversation: anything `format_chat` takes ((prompt, response), messages, a record).
    max_length: longest allowed example; longer ones raise ValueError unless truncate=True,
        which cuts the response (the prompt is never cut; a prompt that leaves no room for
        one response token raises ValueError).
    prompt_length: tokens before the response (bos included).
    """
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("add_bos: the tokenizer has no bos token")
    if add_eos and tokenizer.eos_id is None:
        raise ValueError("add_eos: the tokenizer has no eos token")
    prompt_text, full_text = format_chat(conversation, system=system)
    prompt_ids, response_ids = tokenizer.encode([prompt_text, full_text[len(prompt_text) :]])
    prompt = ([tokenizer.bos_id] if add_bos else []) + prompt_ids
    response = response_ids + ([tokenizer.eos_id] if add_eos else [])
    if not response:
        raise ValueError("conversation: the response is empty (no tokens to train on)")
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2 or None, got {max_length!r}")
        total = len(prompt) + len(response)
        if total > max_length:
            if not truncate:
                raise ValueError(
                    f"max_length: the example has {total} tokens (prompt {len(prompt)}, "
                    f"response {len(response)}), more than max_length={max_length}; "
                    "pass truncate=True to cut the response"
                )
            if len(prompt) + 1 > max_length:
                raise ValueError(
                    f"max_length: the prompt alone has {len(prompt)} tokens, leaving no "
                    f"room for the response within max_length={max_length}"
                )
            response = response[: max_length - len(prompt)]
    input_ids = prompt + response
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in range(len(prompt) - 1, len(input_ids) - 1):
        labels[t] = input_ids[t + 1]
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(prompt)}


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, length: int | None = None
) -> torch.Tensor:
    """Right-pad lists of ints into a (B, L) int64 tensor, L = length or the longest."""
    L = max(len(s) for s in sequences) if length is None else length
    out = torch.full((len(sequences), L), pad_value, dtype=torch.long)
    for b, s in enumerate(sequences):
        out[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def collate_padded(
    items: list[dict], pad_id: int, prefix: str = "", length: int | None = None
) -> dict:
    """Right-padded batch of variable-length examples (keys with `prefix`):
    input_ids (B, L) padded with pad_id, labels (B, L) padded with -100, attention_mask
    (B, L) bool, position_ids (B, L), lengths (B,) int64, and cu_seqlens over the B*L
    flattened tokens where each row's padding is its own segment (so a varlen kernel can run
    on the padded layout; padded positions carry no loss)."""
    ids = [it[prefix + "input_ids"] for it in items]
    lens = torch.tensor([len(s) for s in ids], dtype=torch.long)
    L = int(lens.max()) if length is None else length
    input_ids = pad_batch(ids, pad_id, L)
    labels = pad_batch([it[prefix + "labels"] for it in items], IGNORE_INDEX, L)
    attention_mask = torch.arange(L)[None, :] < lens[:, None]
    position_ids = torch.arange(L).expand(len(items), L).clone().masked_fill_(~attention_mask, 0)
    cu = [0]
    for b, n in enumerate(lens.tolist()):
        cu.append(b * L + n)
        if n < L:
            cu.append((b + 1) * L)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    return {
        prefix + "input_ids": input_ids,
        prefix + "labels": labels,
        prefix + "attention_mask": attention_mask,
        prefix + "position_ids": position_ids,
        prefix + "lengths": lens,
        prefix + "cu_seqlens": cu_seqlens,
        prefix + "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    }


_TOO_LONG = ("error", "truncate", "skip")


def _check_too_long(too_long: str) -> None:
    if too_long not in _TOO_LONG:
        raise ValueError(f"too_long: expected one of {_TOO_LONG}, got {too_long!r}")


def _build(tokenizer, conversation, max_length, system, too_long, index) -> dict | None:
    try:
        return build_sft_example(
            tokenizer, conversation, max_length, system=system, truncate=too_long == "truncate"
        )
    except (ValueError, TypeError) as exc:
        if too_long == "skip" and str(exc).startswith("max_length:"):
            return None
        raise type(exc)(f"records[{index}]: {exc}") from exc


class SFTDataset:
    """Tokenized SFT examples (all encoded up front in one batch call per example).

    records: conversations as `format_chat` takes them (e.g. fastllm.data.load_instructions()).
    too_long: what to do with an example longer than max_length: "error" (ValueError naming
        the record), "truncate" (cut the response) or "skip" (leave it out; `self.skipped`
        lists the indices of the records left out).
    item -> {"input_ids" (L,), "labels" (L,)} int64; `collate` right-pads (see collate_padded).
    """

    def __init__(
        self,
        records: Sequence[Any],
        tokenizer,
        max_length: int | None = None,
        *,
        system: str | None = None,
        too_long: str = "error",
    ):
        _check_too_long(too_long)
        if len(records) == 0:
            raise ValueError("records: empty dataset")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_id
        self.examples, self.skipped = [], []
        for i, rec in enumerate(records):
            ex = _build(tokenizer, rec, max_length, system, too_long, i)
            if ex is None:
                self.skipped.append(i)
            else:
                self.examples.append(ex)
        if not self.examples:
            raise ValueError(
                f"max_length: all {len(records)} records are longer than "
                f"max_length={max_length} and were skipped"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.examples[index]
        return {"input_ids": torch.tensor(ex["input_ids"]), "labels": torch.tensor(ex["labels"])}

    def collate(self, items: list[dict]) -> dict:
        return collate_padded(items, self.pad_id)


class PreferenceDataset:
    """(prompt, chosen, rejected) triples for reward models and DPO.

    records: dicts with "prompt", "chosen", "rejected" (fastllm.data.load_preferences()).
    too_long: as for SFTDataset (a pair is skipped when either side is too long).
    item -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"};
    `collate` pads chosen and rejected to one common length L, giving chosen_* and rejected_*
    tensors as collate_padded does (lengths[b] - 1 is the index of the last real token, the
    eos, where a reward model reads its score).
    """

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer,
        max_length: int | None = None,
        *,
        system: str | None = None,
        too_long: str = "error",
    ):
        _check_too_long(too_long)
        if len(records) == 0:
            raise ValueError("records: empty dataset")
        self.pad_id = tokenizer.pad_id
        self.examples, self.skipped = [], []
        for i, rec in enumerate(records):
            missing = {"prompt", "chosen", "rejected"} - set(rec)
            if missing:
                raise ValueError(f"records[{i}]: missing keys {sorted(missing)}")
            pair = {
                side: _build(tokenizer, (rec["prompt"], rec[side]), max_length, system, too_long, i)
                for side in ("chosen", "rejected")
            }
            if pair["chosen"] is None or pair["rejected"] is None:
                self.skipped.append(i)
            else:
                self.examples.append(pair)
        if not self.examples:
            raise ValueError(
                f"max_length: all {len(records)} records are longer than "
                f"max_length={max_length} and were skipped"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.examples[index]
        return {
            f"{side}_{key}": torch.tensor(ex[side][key])
            for side in ("chosen", "rejected")
            for key in ("input_ids", "labels")
        }

    def collate(self, items: list[dict]) -> dict:
        L = max(max(len(it["chosen_input_ids"]), len(it["rejected_input_ids"])) for it in items)
        out = collate_padded(items, self.pad_id, prefix="chosen_", length=L)
        out.update(collate_padded(items, self.pad_id, prefix="rejected_", length=L))
        return out


class PackedSFTDataset:
    """SFT (or any prompt-masked) examples packed into fixed-length blocks, like
    PackedDataset's pre-training blocks: consecutive examples fill a block of `block_size`
    tokens until the next one does not fit; the rest of the block is padding (pad_id, labels
    -100) forming its own segment. Each example is its own segment in cu_seqlens and its
    position_ids start at 0, so with varlen attention nothing leaks between examples, and
    its labels (already shifted inside the example) never point into the next one.

    examples: an SFTDataset, or a list of {"input_ids": list[int], "labels": list[int]}.
    item -> {"input_ids", "labels", "position_ids"} (T,) int64 and "cu_seqlens" (S+1,) int32;
    `collate` as PackedDataset's.
    """

    def __init__(self, examples, block_size: int, pad_id: int | None = None):
        if isinstance(examples, SFTDataset):
            pad_id = examples.pad_id if pad_id is None else pad_id
            examples = examples.examples
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if pad_id is None:
            raise ValueError("pad_id: required when examples is not an SFTDataset")
        if len(examples) == 0:
            raise ValueError("examples: empty dataset")
        self.block_size = block_size
        self.pad_id = pad_id
        self.examples = examples
        self.blocks: list[list[int]] = []  # example indices per block, in order
        used = block_size
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise ValueError(
                    f"examples[{i}]: input_ids has {n} tokens but labels has {len(ex['labels'])}"
                )
            if n > block_size:
                raise ValueError(
                    f"block_size: examples[{i}] has {n} tokens, more than "
                    f"block_size={block_size} (build the examples with "
                    f"max_length <= block_size)"
                )
            if n == 0:
                continue
            if used + n > block_size:
                self.blocks.append([])
                used = 0
            self.blocks[-1].append(i)
            used += n

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        T = self.block_size
        input_ids = torch.full((T,), self.pad_id, dtype=torch.long)
        labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(T, dtype=torch.long)
        cu, s = [0], 0
        for i in self.blocks[index]:
            ex = self.examples[i]
            n = len(ex["input_ids"])
            input_ids[s : s + n] = torch.as_tensor(ex["input_ids"])
            labels[s : s + n] = torch.as_tensor(ex["labels"])
            position_ids[s : s + n] = torch.arange(n)
            s += n
            cu.append(s)
        if s < T:  # padding: its own segment
            position_ids[s:] = torch.arange(T - s)
            cu.append(T)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        }

    @staticmethod
    def collate(items: list[dict]) -> dict:
        from fastllm.data.packing import collate_blocks

        return collate_blocks(items)
