"""BatchLoader: seeded epoch orders, exact resume from state_dict (mid-epoch, at an epoch
boundary, through JSON), rank sharding, set_epoch, and bad input."""

import json

import pytest
import torch

from fastllm.data import BatchLoader, MLMDataset, PackedDataset


class Numbers:
    """Dataset whose item i is {"x": tensor(i)} and which records set_epoch calls."""

    def __init__(self, n):
        self.n = n
        self.epochs = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor(i)}

    def set_epoch(self, e):
        self.epochs.append(e)


def ids(batch):
    return batch["x"].tolist()


def take(loader, k):
    return [ids(loader.next_batch()) for _ in range(k)]


def test_each_epoch_is_a_seeded_permutation():
    n, bs = 23, 4
    loader = BatchLoader(Numbers(n), bs, seed=7, drop_last=False)
    assert len(loader) == 6
    e0 = [ids(b) for b in loader]
    e1 = [ids(b) for b in loader]
    for epoch in (e0, e1):
        flat = [i for b in epoch for i in b]
        assert sorted(flat) == list(range(n))  # every example exactly once
        assert [len(b) for b in epoch] == [4, 4, 4, 4, 4, 3]
    assert e0 != e1  # a new order every epoch
    assert [ids(b) for b in BatchLoader(Numbers(n), bs, seed=7, drop_last=False)] == e0
    assert [ids(b) for b in BatchLoader(Numbers(n), bs, seed=8, drop_last=False)] != e0
    expected = torch.randperm(
        n, generator=torch.Generator().manual_seed(loader_seed(7, 0))
    ).tolist()
    assert [i for b in e0 for i in b] == expected
    plain = BatchLoader(Numbers(n), bs, shuffle=False, drop_last=True)
    assert [ids(b) for b in plain] == [list(range(i, i + 4)) for i in range(0, 20, 4)]


def loader_seed(seed, epoch):
    from fastllm.data.loader import _epoch_seed

    return _epoch_seed(seed, epoch)


@pytest.mark.parametrize("stop", [0, 3, 5, 6, 11])
def test_resume_gives_the_same_batches(stop):
    n, bs = 26, 4  # 6 batches per epoch with drop_last
    reference = take(BatchLoader(Numbers(n), bs, seed=3), 20)
    first = BatchLoader(Numbers(n), bs, seed=3)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = BatchLoader(Numbers(n), bs, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert head + take(resumed, 20 - stop) == reference


def test_iteration_and_next_batch_share_state():
    ds = Numbers(12)
    loader = BatchLoader(ds, 4, seed=1)
    a = loader.next_batch()
    rest = [ids(b) for b in loader]  # the remaining 2 batches of epoch 0
    assert len(rest) == 2 and loader.epoch == 1 and loader.position == 0
    assert sorted(ids(a) + sum(rest, [])) == list(range(12))
    assert ds.epochs[0] == 0 and ds.epochs[-1] == 0
    loader.next_batch()
    assert ds.epochs[-1] == 1


def test_ranks_split_each_global_batch():
    n, bs, world = 30, 3, 2
    single = BatchLoader(Numbers(n), bs * world, seed=5)
    ranks = [BatchLoader(Numbers(n), bs, seed=5, rank=r, world_size=world) for r in range(world)]
    assert len(ranks[0]) == len(single) == 5
    for _ in range(7):  # across an epoch boundary
        glob = ids(single.next_batch())
        parts = [ids(r.next_batch()) for r in ranks]
        assert parts[0] + parts[1] == glob


def test_mlm_masks_resume_identically():
    docs = [[1] + list(range(5, 5 + k)) + [2] for k in (40, 9, 70, 33, 18, 51)]

    def make():
        return BatchLoader(
            MLMDataset(PackedDataset(docs, 8), mask_id=4, vocab_size=200, special_ids=(0, 1, 2, 3)),
            4,
            seed=2,
        )

    ref = make()
    expected = [ref.next_batch() for _ in range(12)]
    first = make()
    for _ in range(7):
        first.next_batch()
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for want in expected[7:]:
        got = resumed.next_batch()
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
            got["labels"], want["labels"]
        )


def test_bad_input():
    with pytest.raises(ValueError, match="dataset: empty dataset"):
        BatchLoader([], 2)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        BatchLoader(Numbers(4), 0)
    with pytest.raises(
        ValueError,
        match=r"batch_size: the dataset has 4 examples, fewer than one global batch of "
        r"batch_size \* world_size = 6",
    ):
        BatchLoader(Numbers(4), 3, world_size=2)
    with pytest.raises(ValueError, match="rank: expected an int in"):
        BatchLoader(Numbers(8), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_last: must be True when world_size > 1"):
        BatchLoader(Numbers(8), 2, world_size=2, drop_last=False)
    loader = BatchLoader(Numbers(8), 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="state: batch_size is 2 in the saved state but 4"):
        BatchLoader(Numbers(8), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="state: num_examples is 8 in the saved state but 9"):
        BatchLoader(Numbers(9), 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state: position 99 is outside \[0, 4\]"):
        loader.load_state_dict({**state, "position": 99})
    with pytest.raises(KeyError, match="state: missing 'shuffle'"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "shuffle"})
    with pytest.raises(TypeError, match="default_collate expects dict items"):
        BatchLoader([1, 2, 3], 2).next_batch()
