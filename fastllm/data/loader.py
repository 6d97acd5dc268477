"""`BatchLoader`: deterministic, resumable batches over any map-style dataset.

The order of epoch e is a permutation drawn from (seed, e) alone, and the loader's state is
just (epoch, position in the epoch), so `state_dict()` saved with a checkpoint and
`load_state_dict()` after a restart give exactly the batches the killed run would have seen
next. With world_size > 1 every rank draws the same permutation and takes its own slice of
each global batch (batch_size * world_size examples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

_STATE_VERSION = 1


def default_collate(items: list) -> dict:
    """Stack a list of dicts of equal-shape tensors (or ints) into a dict of batched tensors."""
    if not items:
        raise ValueError("items: cannot collate an empty batch")
    if not isinstance(items[0], dict):
        raise TypeError(
            f"items: default_collate expects dict items, got {type(items[0]).__name__}; "
            "pass collate_fn="
        )
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.tensor(vals)
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class BatchLoader:
    """Batches of `dataset` in a seeded order that a restarted run can resume.

    dataset: len() and [index]; its `collate(items)` method is used when it has one (else
        collate_fn, else default_collate); its `set_epoch(epoch)` is called when it has one.
    batch_size: examples per batch on this rank.
    seed: the order of epoch e is torch.randperm(len(dataset)) under a generator seeded from
        (seed, e); shuffle=False keeps dataset order.
    drop_last: drop an epoch's last incomplete batch (required when world_size > 1).

    for batch in loader: ...          # the rest of the current epoch, then epoch += 1
    loader.next_batch()               # the next batch, moving to the next epoch as needed
    state = loader.state_dict(); loader.load_state_dict(state)
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        collate_fn: Callable | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset: empty dataset")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
        if world_size > 1 and not drop_last:
            raise ValueError(
                "drop_last: must be True when world_size > 1 (ranks must stay in step)"
            )
        if drop_last and n < batch_size * world_size:
            raise ValueError(
                f"batch_size: the dataset has {n} examples, fewer than one global batch "
                f"of batch_size * world_size = {batch_size * world_size} (use drop_last=False "
                "or a smaller batch_size)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.collate_fn = getattr(dataset, "collate", None) or collate_fn or default_collate
        self.epoch = 0
        self.position = 0  # batches of the current epoch already returned
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def __len__(self) -> int:
        """Batches per epoch."""
        g = self.batch_size * self.world_size
        n = len(self.dataset)
        return n // g if self.drop_last else -(-n // g)

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
                self._order = torch.randperm(n, generator=gen)
            else:
                self._order = torch.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def _indices(self, epoch_position: int) -> list[int]:
        g = self.batch_size * self.world_size
        start = epoch_position * g + self.rank * self.batch_size
        return self._epoch_order()[start : start + self.batch_size].tolist()

    def next_batch(self):
        """The next batch; at the end of an epoch, moves on to the next one."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)
        indices = self._indices(self.position)
        self.position += 1
        return self.collate_fn([self.dataset[i] for i in indices])

    def __iter__(self) -> Iterator:
        """The remaining batches of the current epoch (all of the next one if it is done)."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_batch()
        if self.epoch == epoch:
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        """Everything needed to resume: plain ints and bools (JSON- and safetensors-friendly)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_examples": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. The dataset size, batch size, world size, shuffle and
        drop_last must match (a different setting would silently change the data order)."""
        for key in ("num_examples", "batch_size", "world_size", "shuffle", "drop_last"):
            mine = len(self.dataset) if key == "num_examples" else getattr(self, key)
            if key not in state:
                raise KeyError(f"state: missing {key!r}")
            if state[key] != mine:
                raise ValueError(
                    f"state: {key} is {state[key]!r} in the saved state but {mine!r} "
                    "in this loader; resuming would change the data order"
                )
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"state: position {state['position']} is outside [0, {len(self)}]")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = -1
