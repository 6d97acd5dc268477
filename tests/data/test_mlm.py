"""MLM masking: the 15% / 80-10-10 statistics, special tokens untouched, labels, determinism,
MLMDataset's (seed, epoch, index) masks, bad input."""

import pytest
import torch

from fastllm.data import IGNORE_INDEX, MLMDataset, PackedDataset, mask_tokens

V, MASK = 1000, 4
SPECIAL = (0, 1, 2, 3)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, shape, generator=g)
    x[:, 0] = 1
    x[:, -1] = 2
    x[:, -5:-1] = 3  # padding
    return x


def test_statistics_and_invariants():
    x = _inputs((256, 1024))
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(x, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, generator=g)
    assert out.shape == x.shape and labels.shape == x.shape
    chosen = labels != IGNORE_INDEX
    maskable = ~torch.isin(x, torch.tensor(SPECIAL))
    # never a special token; labels hold the original token
    assert not (chosen & ~maskable).any()
    assert torch.equal(labels[chosen], x[chosen])
    # everything not chosen is unchanged
    assert torch.equal(out[~chosen], x[~chosen])
    n = int(maskable.sum())
    rate = chosen.sum().item() / n
    assert abs(rate - 0.15) < 0.004, rate  # binomial std ~ 0.0007
    c = chosen.sum().item()
    masked = (out == MASK) & chosen
    kept = (out == x) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / c - 0.8) < 0.01
    assert (
        abs(kept.sum().item() / c - 0.1) < 0.01
    )  # (a random draw equal to the original counts as kept: 1/995)
    assert abs(randomised.sum().item() / c - 0.1) < 0.01
    assert not torch.isin(out[randomised], torch.tensor(SPECIAL + (MASK,))).any()
    assert (out[randomised] < V).all()


def test_deterministic_per_generator_and_every_row_has_a_target():
    x = _inputs((64, 12))
    a = mask_tokens(
        x,
        mask_id=MASK,
        vocab_size=V,
        special_ids=SPECIAL,
        generator=torch.Generator().manual_seed(5),
    )
    b = mask_tokens(
        x,
        mask_id=MASK,
        vocab_size=V,
        special_ids=SPECIAL,
        generator=torch.Generator().manual_seed(5),
    )
    c = mask_tokens(
        x,
        mask_id=MASK,
        vocab_size=V,
        special_ids=SPECIAL,
        generator=torch.Generator().manual_seed(6),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert ((a[1] != IGNORE_INDEX).sum(-1) >= 1).all()
    # a row made only of special tokens stays as it is, with no target
    only_special = torch.tensor([[1, 3, 3, 2]])
    out, labels = mask_tokens(only_special, mask_id=MASK, vocab_size=V, special_ids=SPECIAL)
    assert torch.equal(out, only_special) and (labels == IGNORE_INDEX).all()


def test_mlm_dataset_masks_depend_only_on_seed_epoch_index():
    docs = [[1] + list(range(5, 5 + n)) + [2] for n in (30, 7, 50, 12, 90)]
    base = PackedDataset(docs, 16)
    ds = MLMDataset(base, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, seed=3)
    again = MLMDataset(
        PackedDataset(docs, 16), mask_id=MASK, vocab_size=V, special_ids=SPECIAL, seed=3
    )
    for i in (0, 3, 7):
        a, b = ds[i], again[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        # positions / cu_seqlens of the base block are kept; labels are MLM labels (unshifted)
        assert torch.equal(a["position_ids"], base[i]["position_ids"])
        assert torch.equal(a["cu_seqlens"], base[i]["cu_seqlens"])
        chosen = a["labels"] != IGNORE_INDEX
        assert torch.equal(a["labels"][chosen], base[i]["input_ids"][chosen])
    first = [ds[i]["labels"] for i in range(len(ds))]
    ds.set_epoch(1)
    second = [ds[i]["labels"] for i in range(len(ds))]
    assert any(not torch.equal(x, y) for x, y in zip(first, second, strict=True))  # dynamic masking
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 16) and batch["cu_seqlens"][-1] == 32


def test_from_tokenizer(botchan_tokenizer):
    base = PackedDataset([[1, 300, 301, 302, 2] * 10], 8)
    ds = MLMDataset.from_tokenizer(base, botchan_tokenizer)
    assert ds.mask_id == botchan_tokenizer.mask_id == 4
    assert set(ds.special_ids) == botchan_tokenizer.special_ids


def test_bad_input():
    x = _inputs((2, 8))
    with pytest.raises(ValueError, match=r"mask_prob: expected a value in \(0, 1\), got 0.0"):
        mask_tokens(x, mask_id=MASK, vocab_size=V, mask_prob=0.0)
    with pytest.raises(ValueError, match="mask_id: expected an id in"):
        mask_tokens(x, mask_id=V, vocab_size=V)
    with pytest.raises(
        ValueError, match=r"input_ids: token id 1000 is outside the vocabulary \[0, 1000\)"
    ):
        mask_tokens(torch.tensor([[5, 1000]]), mask_id=MASK, vocab_size=V)
    with pytest.raises(TypeError, match="input_ids: expected an int64 tensor"):
        mask_tokens(x.float(), mask_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="base: empty dataset"):
        MLMDataset([], mask_id=MASK, vocab_size=V)

    class NoMask:
        mask_id = None

    with pytest.raises(ValueError, match="tokenizer: has no mask token"):
        MLMDataset.from_tokenizer(PackedDataset([[1, 2, 3]], 2), NoMask())
