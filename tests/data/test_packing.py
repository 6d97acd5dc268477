"""PackedDataset against a token-by-token reference: inputs, shifted labels masked across
documents, positions restarting per document, cu_seqlens; collation; bad input."""

import random

import pytest
import torch

from fastllm.data import IGNORE_INDEX, PackedDataset, collate_blocks, load_corpus


def reference_block(docs, T, i, doc_boundaries=True):
    """Plain-Python block i: walk the stream token by token."""
    stream = [(tok, d) for d, doc in enumerate(docs) for tok in doc]
    window = stream[i * T : i * T + T + 1]
    inputs, labels, positions, cu = [], [], [], []
    for t in range(T):
        tok, d = window[t]
        nxt, nd = window[t + 1]
        inputs.append(tok)
        if not doc_boundaries:
            labels.append(nxt)
            positions.append(t)
            continue
        labels.append(nxt if nd == d else IGNORE_INDEX)
        if t == 0 or window[t - 1][1] != d:
            cu.append(t)
            positions.append(0)
        else:
            positions.append(positions[-1] + 1)
    cu = [0, T] if not doc_boundaries else cu + [T]
    return inputs, labels, positions, cu


def random_docs(rng, n_docs, vocab=50):
    docs = []
    for _ in range(n_docs):
        n = rng.choice([0, 1, 2, rng.randint(3, 9), rng.randint(10, 40)])
        docs.append([1] + [rng.randrange(3, vocab) for _ in range(n)] + [2])
    return docs


@pytest.mark.parametrize("T", [1, 3, 7, 16, 64])
@pytest.mark.parametrize("doc_boundaries", [True, False])
def test_blocks_match_reference(T, doc_boundaries):
    rng = random.Random(T * 7 + doc_boundaries)
    docs = random_docs(rng, 30)
    docs.insert(5, [])  # empty documents are skipped
    ds = PackedDataset(docs, T, vocab_size=50, doc_boundaries=doc_boundaries)
    nonempty = [d for d in docs if d]
    n_tokens = sum(map(len, nonempty))
    assert len(ds) == (n_tokens - 1) // T
    for i in range(len(ds)):
        item = ds[i]
        inputs, labels, positions, cu = reference_block(nonempty, T, i, doc_boundaries)
        assert item["input_ids"].tolist() == inputs
        assert item["labels"].tolist() == labels
        assert item["position_ids"].tolist() == positions
        assert item["cu_seqlens"].tolist() == cu
        assert item["input_ids"].dtype == torch.long and item["cu_seqlens"].dtype == torch.int32


def test_hand_worked_example():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]]
    ds = PackedDataset(docs, 5)
    assert len(ds) == 2  # 13 tokens: blocks need 5 + 1
    b0, b1 = ds[0], ds[1]
    assert b0["input_ids"].tolist() == [1, 5, 6, 2, 1]
    assert b0["labels"].tolist() == [5, 6, 2, -100, 7]
    assert b0["position_ids"].tolist() == [0, 1, 2, 3, 0]
    assert b0["cu_seqlens"].tolist() == [0, 4, 5]
    assert b1["input_ids"].tolist() == [7, 2, 1, 8, 9]
    assert b1["labels"].tolist() == [2, -100, 8, 9, 10]
    assert b1["position_ids"].tolist() == [0, 1, 0, 1, 2]  # the continued document restarts at 0
    assert b1["cu_seqlens"].tolist() == [0, 2, 5]
    assert ds[-1]["input_ids"].tolist() == b1["input_ids"].tolist()
    with pytest.raises(IndexError, match="index"):
        ds[2]


def test_collate_offsets_cu_seqlens():
    ds = PackedDataset([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]], 5)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].shape == (2, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 5, 7, 10]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 4
    # Each segment of the flattened batch is one document piece: positions run 0..len-1.
    flat_pos = batch["position_ids"].flatten()
    cu = batch["cu_seqlens"].tolist()
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        assert flat_pos[s:e].tolist() == list(range(e - s))
    with pytest.raises(ValueError, match="items: cannot collate an empty batch"):
        collate_blocks([])


def test_from_texts_with_tokenizer(botchan_tokenizer):
    tok = botchan_tokenizer
    texts = load_corpus("botchan", unit="paragraph")[:40]
    ds = PackedDataset.from_texts(tok, texts, 64)
    stream = [i for t in tok.encode(texts, add_bos=True, add_eos=True) for i in t]
    seen = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert seen == stream[: len(seen)]
    # every kept target is the next token inside the same document
    for i in range(len(ds)):
        item = ds[i]
        keep = item["labels"] != IGNORE_INDEX
        nxt = torch.tensor(stream[i * 64 + 1 : i * 64 + 65])
        assert torch.equal(item["labels"][keep], nxt[keep])
        assert (item["input_ids"][~keep] == tok.eos_id).all()  # only a document's eos has no target


def test_bad_input():
    with pytest.raises(ValueError, match="documents: empty corpus"):
        PackedDataset([], 8)
    with pytest.raises(ValueError, match="documents: all 2 documents are empty"):
        PackedDataset([[], []], 8)
    with pytest.raises(
        ValueError, match=r"block_size: the corpus has 4 tokens, fewer than block_size \+ 1 = 9"
    ):
        PackedDataset([[1, 2], [3, 4]], 8)
    with pytest.raises(ValueError, match="block_size: expected a positive int"):
        PackedDataset([[1, 2, 3]], 0)
    with pytest.raises(
        ValueError,
        match=r"documents: token id 50 in document 1 is outside the vocabulary \[0, 50\)",
    ):
        PackedDataset([[1, 2, 3], [4, 50]], 2, vocab_size=50)
    with pytest.raises(ValueError, match=r"documents: token id -3 in document 0"):
        PackedDataset([[1, -3, 3], [4, 5]], 2, vocab_size=50)
    with pytest.raises(ValueError, match="texts: empty corpus"):
        PackedDataset.from_texts(None, [], 8)


def test_cu_seqlens_drive_varlen_attention_per_document():
    """The collated cu_seqlens plugged into fastllm's attention keep every query inside its
    own document piece: compare with a dense mask built from the document index of tokens."""
    from fastllm.ops.attention import attention

    rng = random.Random(0)
    docs = random_docs(rng, 12)
    T, H, D = 16, 2, 8
    ds = PackedDataset(docs, T)
    idx = [0, 2, 3]
    batch = ds.collate([ds[i] for i in idx])
    N = len(idx) * T
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention(
        q, k, v, causal=True, cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"]
    )
    # dense reference: token n sees token m iff same block, same document, m <= n
    doc = torch.cat([ds.doc_of_token[i * T : (i + 1) * T] for i in idx]).long()
    block = torch.arange(N) // T
    n, m = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (block[:, None] == block[None, :]) & (m <= n)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / D**0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    expected = torch.einsum("hnm,mhd->nhd", probs, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
