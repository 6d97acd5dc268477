"""Pre-training blocks: token documents concatenated into one stream and cut into blocks of
`block_size` tokens, keeping where each document starts so attention and positions can stay
inside documents (variable-length attention).

Labels are aligned with positions, already shifted: labels[t] is the token the model must
predict at position t (the next token in the stream), or -100 where no loss is taken. With
doc_boundaries=True, the target of a document's last token (the first token of the next
document) is -100, position_ids restart at 0 at every document start inside a block (and at
the block start), and cu_seqlens (S+1,) int32 holds the segment offsets FlashAttention's
varlen interface expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastllm.labels import IGNORE_INDEX


def _check_stream(stream: torch.Tensor, doc_of_token: torch.Tensor, vocab_size: int | None) -> None:
    if vocab_size is None or stream.numel() == 0:
        return
    bad = (stream < 0) | (stream >= vocab_size)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        doc = int(doc_of_token[pos])
        raise ValueError(
            f"documents: token id {int(stream[pos])} in document {doc} is outside "
            f"the vocabulary [0, {vocab_size})"
        )


def segments(doc_of_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_of_token (T,) -> (position_ids (T,) int64, cu_seqlens (S+1,) int32), where a
    segment is a maximal run of one document inside the block."""
    T = doc_of_token.numel()
    new = torch.ones(T, dtype=torch.bool)
    new[1:] = doc_of_token[1:] != doc_of_token[:-1]
    starts = new.nonzero().flatten()  # (S,)
    seg_index = torch.cumsum(new.long(), 0) - 1  # (T,) which segment each token is in
    position_ids = torch.arange(T) - starts[seg_index]
    cu_seqlens = torch.cat([starts, torch.tensor([T])]).to(torch.int32)
    return position_ids, cu_seqlens


class PackedDataset:
    """Fixed-length causal-LM blocks from a list of token documents.

    documents: list of token-id sequences (one per document; add bos/eos when encoding, e.g.
        tokenizer.encode(texts, add_bos=True, add_eos=True)). Empty documents are skipped.
    block_size: T, tokens per block. Block i covers stream[i*T : i*T+T] and its labels
        stream[i*T+1 : i*T+T+1]; the tail that does not fill a block is dropped.
    vocab_size: when given, every id is checked to lie in [0, vocab_size).
    doc_boundaries: keep documents apart (see the module docstring); False gives the classic
        contiguous stream: positions 0..T-1, one segment, no masked labels.

    item i -> {"input_ids" (T,), "labels" (T,), "position_ids" (T,) int64, "cu_seqlens" (S+1,)
    int32}; `collate` stacks B items into (B, T) tensors and one cu_seqlens over the B*T
    flattened tokens plus "max_seqlen" (int).
    """

    def __init__(
        self,
        documents: Sequence[Sequence[int]],
        block_size: int,
        *,
        vocab_size: int | None = None,
        doc_boundaries: bool = True,
    ):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size: expected a positive int or None, got {vocab_size!r}")
        if len(documents) == 0:
            raise ValueError("documents: empty corpus (no documents)")
        parts, doc_ids = [], []
        for i, doc in enumerate(documents):
            t = torch.as_tensor(doc, dtype=torch.long).flatten()
            if t.numel() == 0:
                continue
            parts.append(t)
            doc_ids.append(torch.full((t.numel(),), i, dtype=torch.int32))
        if not parts:
            raise ValueError(f"documents: all {len(documents)} documents are empty")
        self.stream = torch.cat(parts)  # (N,) every token of the corpus
        self.doc_of_token = torch.cat(doc_ids)  # (N,) index of the document holding it
        _check_stream(self.stream, self.doc_of_token, vocab_size)
        n = self.stream.numel()
        if n < block_size + 1:
            raise ValueError(
                f"block_size: the corpus has {n} tokens, fewer than "
                f"block_size + 1 = {block_size + 1} needed for one block"
            )
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.doc_boundaries = doc_boundaries
        self.num_blocks = (n - 1) // block_size

    @classmethod
    def from_texts(
        cls,
        tokenizer,
        texts: Sequence[str],
        block_size: int,
        *,
        add_bos: bool = True,
        add_eos: bool = True,
        doc_boundaries: bool = True,
    ) -> PackedDataset:
        """Encode texts (one document each) with bos/eos and pack them."""
        if len(texts) == 0:
            raise ValueError("texts: empty corpus (no documents)")
        docs = tokenizer.encode(list(texts), add_bos=add_bos, add_eos=add_eos)
        return cls(docs, block_size, vocab_size=tokenizer.vocab_size, doc_boundaries=doc_boundaries)

    @property
    def num_tokens(self) -> int:
        return int(self.stream.numel())

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(
                f"index: expected a block index in [0, {self.num_blocks}), got {index}"
            )
        index %= self.num_blocks
        T = self.block_size
        s = index * T
        input_ids = self.stream[s : s + T].clone()
        labels = self.stream[s + 1 : s + T + 1].clone()
        if not self.doc_boundaries:
            return {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": torch.arange(T),
                "cu_seqlens": torch.tensor([0, T], dtype=torch.int32),
            }
        docs = self.doc_of_token[s : s + T + 1]
        labels[docs[1:] != docs[:-1]] = IGNORE_INDEX  # never predict across a document start
        position_ids, cu_seqlens = segments(docs[:-1])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seqlens": cu_seqlens,
        }

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict:
        return collate_blocks(items)


def collate_blocks(items: list[dict[str, torch.Tensor]]) -> dict:
    """Stack equal-length blocks: every (T,) tensor becomes (B, T); the per-block cu_seqlens
    are offset by b*T and joined into one (S_total+1,) int32 tensor over the B*T flattened
    tokens; max_seqlen is the longest segment (int). Other keys are stacked as they are."""
    if not items:
        raise ValueError("items: cannot collate an empty batch")
    T = items[0]["input_ids"].numel()
    out: dict = {}
    for key in items[0]:
        if key == "cu_seqlens":
            continue
        out[key] = torch.stack([it[key] for it in items])
    if "cu_seqlens" in items[0]:
        pieces = [it["cu_seqlens"][:-1].to(torch.int32) + b * T for b, it in enumerate(items)]
        cu = torch.cat(pieces + [torch.tensor([len(items) * T], dtype=torch.int32)])
        out["cu_seqlens"] = cu
        out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    return out
