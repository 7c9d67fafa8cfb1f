"""i-CLEVR data for the multi-label conditional DDPM: a folder of images, train.json and objects.json.

Layout (the lab's, or what p1_ddpm/render_iclevr.py writes):
    ROOT/train.json     {"file.png": ["red sphere", "cyan cube"], ...}   1-3 distinct objects each
    ROOT/objects.json   {"gray cube": 0, ..., "yellow cylinder": 23}
    ROOT/images/*.png   (or the images directly in ROOT)
Images are converted to RGB and resized to 64x64; a condition is the multi-hot vector of its objects.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.datasets import to_8_bit, upright
from common.errors import UserError
from common.fileio import folder_error
from common.step_batches import BatchStream, step_batch_loader
from p1_ddpm.render_iclevr import check_label_list, load_json

IMAGE_SIZE = 64


def load_objects(path: str | os.PathLike) -> dict[str, int]:
    """objects.json -> {name: index}, checked to be a 0..K-1 numbering."""
    objects = load_json(path)
    if not isinstance(objects, dict) or not objects:
        raise UserError(f"{path}: expected an object mapping names to indices")
    if sorted(objects.values()) != list(range(len(objects))):
        raise UserError(f"{path}: indices must be 0..{len(objects) - 1}, each once")
    return objects


def multi_hot(names: list[str], objects: dict[str, int], where: str = "label list") -> torch.Tensor:
    """A float (K,) vector with ones at the objects' indices; UserError for unknown, repeated or > 3 names."""
    vec = torch.zeros(len(objects))
    vec[check_label_list(names, where, objects)] = 1.0
    return vec


def load_label_lists(path: str | os.PathLike, objects: dict[str, int]) -> tuple[list[list[str]], torch.Tensor]:
    """A test.json-style file (a list of label lists) -> (the lists, (N, K) multi-hot)."""
    data = load_json(path)
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of label lists")
    cond = torch.stack([multi_hot(v, objects, f"{path} entry {i}") for i, v in enumerate(data)])
    return data, cond


def find_image_dir(root: Path) -> Path:
    return root / "images" if (root / "images").is_dir() else root


def load_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: image listed in train.json not found")
    try:
        with Image.open(path) as im:
            im = to_8_bit(upright(im)).convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


class ICLEVRDataset(Dataset):
    """Items are (uint8 image 3x64x64, float multi-hot (K,)). The label lists are read and every image file is
    checked to be there up front (a missing file fails before training starts); the images are decoded when an
    item is read (in the loader's workers), so start-up does not decode the whole folder. `images` decodes them
    all at once, for code that wants one tensor (the judge's trainer)."""

    def __init__(self, root: str | os.PathLike, names: list[str] | None = None, labels_json: str | None = None,
                 objects_json: str | None = None):
        root = Path(root)
        if not root.is_dir():
            raise folder_error(root, "data folder not found")
        labels_path = Path(labels_json) if labels_json else root / "train.json"
        self.objects = load_objects(objects_json or root / "objects.json")
        labels = load_json(labels_path)
        if not isinstance(labels, dict) or not labels:
            raise UserError(f"{labels_path}: expected a non-empty object mapping image files to label lists")
        self.names = list(labels) if names is None else list(names)
        self.image_dir = find_image_dir(root)
        self.cond = torch.stack([multi_hot(labels[n], self.objects, f"{labels_path} entry {n!r}") for n in self.names])
        for n in self.names:
            if not (self.image_dir / n).is_file():
                raise UserError(f"{self.image_dir / n}: image listed in train.json not found")
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)

    def image(self, i: int) -> torch.Tensor:
        """Image i, decoded now: uint8 (3, 64, 64)."""
        return torch.from_numpy(load_image(self.image_dir / self.names[i]).copy()).permute(2, 0, 1)

    @property
    def images(self) -> torch.Tensor:
        """Every image, decoded once and kept: uint8 (N, 3, 64, 64)."""
        if self._images is None:
            self._images = torch.from_numpy(np.stack([load_image(self.image_dir / n) for n in self.names])
                                            ).permute(0, 3, 1, 2)
        return self._images

    def __getitem__(self, i: int):
        image = self._images[i] if self._images is not None else self.image(i)
        return image, self.cond[i]


def split_names(root: str | os.PathLike, val_fraction: float, seed: int,
                labels_json: str | None = None) -> tuple[list[str], list[str]]:
    """A seeded random split of train.json's files into (train, validation)."""
    path = Path(labels_json) if labels_json else Path(root) / "train.json"
    labels = load_json(path)
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: expected a non-empty object mapping image files to label lists")
    names = sorted(labels)
    perm = np.random.default_rng(seed).permutation(len(names))
    n_val = max(1, int(round(val_fraction * len(names)))) if len(names) > 1 else 0
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return train, val


class ICLEVRDataModule(pl.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 64, seed: int = 0, num_workers: int = 0,
                 val_fraction: float = 0.02, labels_json: str | None = None, objects_json: str | None = None):
        super().__init__()
        self.root, self.batch_size, self.seed, self.num_workers = root, batch_size, seed, num_workers
        self.val_fraction, self.labels_json, self.objects_json = val_fraction, labels_json, objects_json
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train, val = split_names(self.root, self.val_fraction, self.seed, self.labels_json)
            self.train_set = ICLEVRDataset(self.root, train, self.labels_json, self.objects_json)
            self.val_set = ICLEVRDataset(self.root, val, self.labels_json, self.objects_json)

    @property
    def objects(self) -> dict[str, int]:
        return self.train_set.objects

    def train_dataloader(self) -> DataLoader:
        # a fresh permutation from (seed, data epoch) each pass; batches depend on the step alone (common.step_batches)
        stream = BatchStream(self.train_set, self.batch_size, self.seed)
        return step_batch_loader(self.trainer, stream, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
