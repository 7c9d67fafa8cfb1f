"""Source and target digits for DANN, read from the course layout `<root>/<name>/{data/*.png,train.csv,val.csv}`.

Modes (what a training batch holds):
  source  labelled source images                     {"source": (images, labels)}
  target  labelled target images                     {"target": (images, labels)}
  dann    labelled source and UNLABELLED target      {"source": (images, labels), "target": images}
In dann mode the target's train labels are never handed to the model (the target train set is
wrapped in `ImagesOnly`). Validation loaders: the source's val split (where there is a source
model) and the target's val split, in that order (`val_names`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from common.datasets import CourseImageFolder
from common.errors import UserError
from common.step_batches import ORDER, BatchStream, derived_seed, step_batch_loader

DATASETS = ("mnistm", "svhn", "usps", "mnist")
MODES = ("source", "dann", "target")


def check_dataset_name(name: str, flag: str) -> str:
    if name not in DATASETS:
        raise UserError(f"{flag}: unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    return name


def load_split(root: str | os.PathLike, name: str, split: str) -> CourseImageFolder:
    """One split, 28x28 RGB (grey images are copied into three channels); labels must be digits 0-9."""
    ds = CourseImageFolder(root, name, split, size=28, mode="RGB")
    bad = ds.labels[(ds.labels < 0) | (ds.labels > 9)]
    if len(bad):
        raise UserError(f"{Path(root) / name / (split + '.csv')}: label {int(bad[0])} is not a digit 0-9")
    return ds


class ImagesOnly(Dataset):
    """The images of a labelled set, without the labels (the unlabelled target of DANN)."""

    def __init__(self, labelled: CourseImageFolder):
        self.images = labelled.images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class DomainAdaptationData(pl.LightningDataModule):
    def __init__(self, root: str, source: str, target: str, mode: str, batch_size: int = 128, seed: int = 0,
                 num_workers: int = 0, val_batch_size: int = 512):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.root, self.mode = root, mode
        self.source = check_dataset_name(source, "--source")
        self.target = check_dataset_name(target, "--target")
        if source == target:
            raise UserError(f"--source and --target are the same data set ({source!r})")
        self.batch_size, self.seed, self.num_workers, self.val_batch_size = (
            batch_size,
            seed,
            num_workers,
            val_batch_size,
        )
        self.train_sets: dict[str, Dataset] = {}
        self.val_sets: dict[str, CourseImageFolder] = {}

    @property
    def val_names(self) -> list[str]:
        return ["target"] if self.mode == "target" else ["source", "target"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_sets:
            return
        if self.mode in ("source", "dann"):
            self.train_sets["source"] = load_split(self.root, self.source, "train")
            self.val_sets["source"] = load_split(self.root, self.source, "val")
        if self.mode == "dann":
            self.train_sets["target"] = ImagesOnly(load_split(self.root, self.target, "train"))
        if self.mode == "target":
            self.train_sets["target"] = load_split(self.root, self.target, "train")
        self.val_sets["target"] = load_split(self.root, self.target, "val")
        for key, ds in self.train_sets.items():
            if len(ds) < self.batch_size:
                name = self.source if key == "source" else self.target
                raise UserError(f"{Path(self.root) / name / 'train.csv'}: {len(ds)} images, fewer than one batch "
                                f"({self.batch_size}); lower --batch-size")

    def train_dataloader(self):
        # {"source": batch, "target": batch} for every step; each domain goes through its own permutations, drawn
        # from (seed, domain, data epoch), so the batches of a step never depend on where a run was resumed
        # (common.step_batches)
        streams = {k: BatchStream(ds, self.batch_size, derived_seed(self.seed, ORDER, -1 - i))
                   for i, (k, ds) in enumerate(sorted(self.train_sets.items()))}
        return step_batch_loader(self.trainer, streams, self.num_workers)

    def val_dataloader(self):
        return [
            DataLoader(self.val_sets[k], batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                       persistent_workers=self.num_workers > 0)
            for k in self.val_names
        ]
