"""Digits for the conditional DDPM: the union of course-layout data sets, each image labelled (digit, dataset)."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from common.datasets import CourseImageFolder
from common.errors import UserError
from common.step_batches import BatchStream, step_batch_loader

DIGIT_DATASETS = ("mnistm", "svhn")  # the dataset index is the position here


class DigitUnionDataset(Dataset):
    """Items are (uint8 image 3x28x28, LongTensor [digit, dataset index])."""

    def __init__(self, root: str | os.PathLike, split: str, datasets=DIGIT_DATASETS):
        self.parts = [CourseImageFolder(root, name, split, size=28) for name in datasets]
        for part in self.parts:
            bad = part.labels[(part.labels < 0) | (part.labels > 9)]
            if len(bad):
                raise UserError(f"{Path(root) / part.name / (split + '.csv')}: label {int(bad[0])} is not a digit 0-9")
        self.images = torch.cat([p.images for p in self.parts])
        self.cond = torch.cat([torch.stack([p.labels, torch.full_like(p.labels, k)], dim=1)
                               for k, p in enumerate(self.parts)])
        self.sizes = [len(p) for p in self.parts]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.cond[i]

    def sample_weights(self, temperature: float) -> torch.Tensor:
        """Per-image weights so dataset k is drawn with probability proportional to n_k ** temperature
        (1 = as stored, 0 = every dataset equally often; the small SVHN set needs upweighting)."""
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        mass = sizes ** temperature
        mass = mass / mass.sum()
        return torch.cat([torch.full((n,), float(m / n)) for n, m in zip(self.sizes, mass)])


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 128, temperature: float = 0.5, seed: int = 0,
                 num_workers: int = 0, datasets=DIGIT_DATASETS):
        super().__init__()
        self.root, self.batch_size, self.temperature = root, batch_size, temperature
        self.seed, self.num_workers, self.datasets = seed, num_workers, tuple(datasets)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = DigitUnionDataset(self.root, "train", self.datasets)
            self.val_set = DigitUnionDataset(self.root, "val", self.datasets)

    def train_dataloader(self) -> DataLoader:
        # each data epoch draws len(train_set) images with replacement by the weights, from (seed, epoch):
        # the batches of a step never depend on where a run was resumed (common.step_batches)
        weights = self.train_set.sample_weights(self.temperature)
        stream = BatchStream(self.train_set, self.batch_size, self.seed, weights=weights)
        return step_batch_loader(self.trainer, stream, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
