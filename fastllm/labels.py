"""The label convention of every loss in fastllm, defined once.

Labels are aligned with positions: `labels[..., t]` is what position t is trained to predict,
IGNORE_INDEX where no loss is taken. So every loss pairs `hidden[..., t, :]` with
`labels[..., t]`, nothing is sliced or copied, and packed and padded batches give the same
per-token values.

    objective                          labels[t]                           made by
    next token (pre-training, SFT,     input_ids[t + 1] (already shifted)  fastllm.data (PackedDataset,
      per-token log-probs for RL)                                            SFT datasets), next_token_labels
    masked LM                          the original token at a masked t    fastllm.data.mask_tokens
    token classification               the tag of token t                  the task's dataset

IGNORE_INDEX marks padding, prompts (SFT), the last position of a sequence (nothing follows it)
and the first token of a packed document (it is not predicted from the previous document).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def next_token_labels(
    input_ids: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Shift token ids into next-token labels: out[..., t] = ids[..., t + 1], IGNORE_INDEX at the
    last position of each row (and of each packed sequence), at padding, and wherever `labels`
    (unshifted, Hugging Face style: -100 on tokens not to be predicted) says so.

    input_ids: (B, T) or packed (1, N) / (N,) with cu_seqlens (S + 1,) offsets.
    attention_mask: (B, T), 1 for real tokens; a target that is padding is ignored.
    labels: (B, T) unshifted labels (e.g. input_ids with the prompt set to -100); they are
        shifted instead of input_ids.
    """
    src = input_ids if labels is None else labels
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected shape {list(input_ids.shape)} (as input_ids), got {list(labels.shape)}")
    if src.dim() < 1 or src.shape[-1] < 1:
        raise ValueError(f"input_ids: expected shape [..., T] with T >= 1, got {list(src.shape)}")
    out = torch.full_like(src, IGNORE_INDEX, dtype=torch.long)
    out[..., :-1] = src[..., 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)} (as input_ids), "
                             f"got {list(attention_mask.shape)}")
        real_next = torch.zeros_like(attention_mask, dtype=torch.bool)
        real_next[..., :-1] = attention_mask[..., 1:].bool()
        out = out.masked_fill(~real_next, IGNORE_INDEX)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long() - 1  # the last token of every packed sequence predicts nothing
        out.view(-1)[ends] = IGNORE_INDEX
    return out


def check_shifted(input_ids: Tensor, labels: Tensor) -> None:
    """Catch the most likely convention mistake: passing the (unshifted) input ids as labels,
    Hugging Face style, which would train every position to copy its own token."""
    if labels is input_ids or (labels.shape == input_ids.shape and labels.numel() > 1
                               and not torch.compiler.is_compiling() and torch.equal(labels, input_ids)):
        raise ValueError(
            "labels: equal to input_ids, but fastllm's labels are already shifted (labels[t] is the token "
            "after position t); build them with fastllm.labels.next_token_labels(input_ids)"
        )
