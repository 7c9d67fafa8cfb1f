"""Training batches drawn from (seed, position) alone, so that a resumed run reads exactly what an
uninterrupted one would have read.

A run's batches are numbered b = 0, 1, 2, ... (every loader batch from the start of training, gradient
accumulation's micro-batches included). Rank r of R ranks reads position p = b * R + r; with one process
p = b. Position p of a stream is batch k = p % per_epoch of data epoch e = p // per_epoch, whose item order is
drawn from a generator seeded by (seed, e): a permutation, or (with weights) a draw with replacement. So the
items of a batch are a function of the seed and the position, never of where a run was stopped or resumed,
and each rank reads its own share of every step (rank r of R: the positions r, R + r, 2R + r, ...).

The loader (`step_batch_loader`) yields the batches of one whole run as a single Lightning epoch, from the
position of the step Lightning restored onward; it has no state of its own to save.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from common.seeding import sample_seed

# StepBatches has a length (the run's) and splits its batches between loader workers itself
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

# what a derived seed is for (kept apart so that, e.g., epoch 3's order and batch 3's noise never share a seed)
ORDER, NOISE = 1, 2


def derived_seed(seed: int, purpose: int, index: int) -> int:
    """A 63-bit seed for `index` (an epoch, a position) within `purpose` of a run seeded with `seed`."""
    return sample_seed(sample_seed(seed, -purpose), index)


class BatchStream:
    """The batches of one data set at every position: epoch after epoch of item orders drawn from (seed, epoch).

    weights: None for a fresh permutation each epoch (every item once, the remainder that does not fill a
    batch left out); else per-item weights, and each epoch draws len(dataset) items with replacement
    (as WeightedRandomSampler does)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, weights: torch.Tensor | None = None):
        self.dataset, self.batch_size, self.seed, self.weights = dataset, batch_size, seed, weights
        self.size = len(dataset)
        self.per_epoch = self.size // batch_size
        if self.per_epoch < 1:
            from common.errors import UserError
            raise UserError(f"{self.size} training items, fewer than one batch ({batch_size}); lower --batch-size")
        self._cached: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """The item indices of data epoch `epoch`, in the order they are read."""
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, ORDER, epoch))
            if self.weights is None:
                order = torch.randperm(self.size, generator=g)
            else:
                order = torch.multinomial(self.weights, self.size, replacement=True, generator=g)
            self._cached = (epoch, order)
        return self._cached[1]

    def indices(self, position: int) -> torch.Tensor:
        epoch, k = divmod(position, self.per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, position: int):
        return default_collate([self.dataset[int(i)] for i in self.indices(position)])


class SequentialStream:
    """The batches of a data set that is itself a seeded stream (item i a function of the seed and i, as P5's
    augmented photos): batch p holds items p * batch_size .. (p + 1) * batch_size - 1."""

    def __init__(self, dataset: Dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.per_epoch = max(1, len(dataset) // batch_size)

    def batch(self, position: int):
        first = position * self.batch_size
        return default_collate([self.dataset[first + i] for i in range(self.batch_size)])


Stream = BatchStream | SequentialStream


class StepBatches(IterableDataset):
    """Batches `start` .. `num_batches - 1` of a run: the batch of stream(s) `streams` at position
    b * world_size + rank. `streams`: one stream, or a mapping name -> stream whose batches are
    yielded together as {name: batch}. Worker w of W loader processes makes batches start + w, start + w + W,
    ... (the loader takes them in turn, so the order is kept). Its length is the whole run's, as Lightning
    counts the batches it has already read."""

    def __init__(self, streams: Stream | Mapping[str, Stream], num_batches: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.streams, self.num_batches, self.start = streams, num_batches, start
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, b: int):
        p = b * self.world_size + self.rank
        if isinstance(self.streams, (BatchStream, SequentialStream)):
            return self.streams.batch(p)
        return {name: s.batch(p) for name, s in self.streams.items()}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(self.start + worker, self.num_batches, workers):
            yield self.batch(b)


class StepBatchLoader(DataLoader):
    """A DataLoader over StepBatches. Its place in the run comes from the step Lightning restored before it
    asked for the loader, so it has nothing to save; the (empty) state_dict tells Lightning it resumes."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def step_batch_loader(trainer, streams: Stream | Mapping[str, Stream], num_workers: int = 0,
                      **loader_kwargs) -> DataLoader:
    """The training loader of a LightningDataModule (call it from train_dataloader with self.trainer).

    With a trainer: the run's max_steps x accumulate_grad_batches batches as one epoch, starting at the
    restored step, for this rank of the trainer's world. Without one (a test reading a batch): one pass
    over the (first) stream from position 0. loader_kwargs go to the DataLoader (pin_memory, ...)."""
    if trainer is not None:
        if trainer.max_steps < 0:
            raise ValueError("step_batch_loader needs a Trainer with max_steps")
        accumulate = trainer.accumulate_grad_batches
        num_batches = trainer.max_steps * accumulate
        start, rank, world_size = trainer.global_step * accumulate, trainer.global_rank, trainer.world_size
    else:
        first = streams if isinstance(streams, (BatchStream, SequentialStream)) else next(iter(streams.values()))
        num_batches, start, rank, world_size = first.per_epoch, 0, 0, 1
    return StepBatchLoader(StepBatches(streams, num_batches, start, rank, world_size), batch_size=None,
                           num_workers=num_workers, persistent_workers=num_workers > 0, **loader_kwargs)
