"""Prompts for generation (PPO rollouts, evaluation): the chat template's generation prompt,
tokenized with bos, collated LEFT-padded so every prompt ends at the same column and the
first generated token of every row lands in the same position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastllm.tokenizer.chat import format_prompt


def _conversation(record: Any):
    """A question (str), a list of messages ending with a user turn, or a record with a
    "prompt" key (instruction and preference records) or "messages" (the last assistant turn
    is dropped)."""
    if isinstance(record, dict):
        if "messages" in record:
            msgs = list(record["messages"])
            return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
        if "prompt" in record:
            return record["prompt"]
        raise ValueError(f"a dict needs a 'prompt' or 'messages' key, got keys {sorted(record)}")
    return record


class PromptDataset:
    """Generation prompts: item -> {"input_ids" (P,) int64} = [bos] + encode(format_prompt(...)).

    records: questions (str), message lists ending with a user turn, or records with
        "prompt" / "messages" (load_instructions(), load_preferences()).
    max_prompt_length: longer prompts raise ValueError naming the record, or are left out
        when skip_too_long=True (`self.skipped` lists their indices).
    `collate` left-pads: input_ids (B, P) with pad_id on the left, attention_mask (B, P) bool,
    position_ids (B, P) counting from 0 at each row's first real token (0 on padding),
    lengths (B,).
    """

    def __init__(
        self,
        records: Sequence[Any],
        tokenizer,
        max_prompt_length: int | None = None,
        *,
        system: str | None = None,
        skip_too_long: bool = False,
    ):
        if len(records) == 0:
            raise ValueError("records: empty dataset")
        if tokenizer.bos_id is None:
            raise ValueError("tokenizer: has no bos token")
        self.pad_id = tokenizer.pad_id
        self.examples, self.skipped = [], []
        texts = []
        for i, rec in enumerate(records):
            try:
                texts.append(format_prompt(_conversation(rec), system=system))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"records[{i}]: {exc}") from exc
        for i, ids in enumerate(tokenizer.encode(texts, add_bos=True)):
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                if skip_too_long:
                    self.skipped.append(i)
                    continue
                raise ValueError(
                    f"records[{i}]: max_prompt_length: the prompt has {len(ids)} "
                    f"tokens, more than max_prompt_length={max_prompt_length}"
                )
            self.examples.append(ids)
        if not self.examples:
            raise ValueError(
                f"max_prompt_length: all {len(records)} prompts are longer than "
                f"max_prompt_length={max_prompt_length}"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(self.examples[index])}

    def collate(self, items: list[dict]) -> dict:
        return collate_left_padded(items, self.pad_id)


def collate_left_padded(items: list[dict], pad_id: int) -> dict:
    """Left-pad items' "input_ids" into (B, P); see PromptDataset."""
    if not items:
        raise ValueError("items: cannot collate an empty batch")
    lens = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.long)
    P = int(lens.max())
    input_ids = torch.full((len(items), P), pad_id, dtype=torch.long)
    for b, it in enumerate(items):
        input_ids[b, P - len(it["input_ids"]) :] = it["input_ids"]
    attention_mask = torch.arange(P)[None, :] >= (P - lens)[:, None]
    position_ids = (torch.arange(P)[None, :] - (P - lens)[:, None]).clamp_(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "lengths": lens,
    }
