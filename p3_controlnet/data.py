"""Fill50k in the course layout: <split>/{source/,target/,prompt.json}, prompt.json one JSON object a line.

Each line is {"source": "<file>", "target": "<file>", "prompt": "<text>"}; source is the control image
(circle outline), target the image to generate. Control images are given to the ControlNet in [0, 1],
targets to the VAE in [-1, 1] (as the ControlNet authors' training code does). Prompts are returned as
indices into the data set's list of distinct prompts, so their text embeddings are computed once each.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from common.datasets import load_image
from common.errors import UserError
from common.step_batches import BatchStream, step_batch_loader


def read_prompt_file(path: str | os.PathLike, need_target: bool = True) -> list[dict]:
    """The lines of a prompt.json; UserError naming the file and line for anything malformed."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a prompt file")
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    try:
        # utf-8-sig: a byte-order mark (Notepad) would make the first line invalid JSON
        with open(path, encoding="utf-8-sig") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    items = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        keys = ("source", "target", "prompt") if need_target else ("source", "prompt")
        if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in keys):
            raise UserError(f"{path}:{lineno}: expected {{\"source\": ..., \"target\": ..., \"prompt\": ...}} "
                            f"with string values, got {line.strip()[:120]!r}")
        for k in ("source", "target"):
            v = obj.get(k)
            # "." (or "./") has no parts: it names the folder itself, which the output would replace
            if isinstance(v, str) and (os.path.isabs(v) or ".." in Path(v).parts or not Path(v).parts):
                raise UserError(f"{path}:{lineno}: {k} must be a file name inside the folder, got {v!r}")
        items.append(obj)
    if not items:
        raise UserError(f"{path}: no lines")
    return items


def resolve_split(data: str | os.PathLike, split: str = "training") -> Path:
    """--data may be the fill50k root (holding training/) or a split folder (holding prompt.json)."""
    data = Path(data)
    if (data / "prompt.json").is_file():
        return data
    if (data / split / "prompt.json").is_file():
        return data / split
    if not data.exists():
        raise UserError(f"{data}: data folder not found")
    raise UserError(f"{data}: no prompt.json here or in {split}/ (expected the course layout "
                    f"fill50k/{split}/{{source/,target/,prompt.json}}; make one with p3_controlnet/make_fill50k.py)")


def load_control(path: Path, size: int) -> torch.Tensor:
    """(3,size,size) float in [0,1]; other sizes are resized (bilinear)."""
    return torch.from_numpy(load_image(path, size, resize=True).copy()).permute(2, 0, 1).float() / 255.0


def load_target(path: Path, size: int) -> torch.Tensor:
    """(3,size,size) float in [-1,1]."""
    return torch.from_numpy(load_image(path, size, resize=True).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class Fill50kDataset(Dataset):
    """Items: {'control': (3,S,S) in [0,1], 'target': (3,S,S) in [-1,1], 'prompt_id': int, 'index': int}."""

    def __init__(self, root: Path, items: list[dict], prompt_ids: list[int], size: int):
        self.root, self.items, self.prompt_ids, self.size = Path(root), items, prompt_ids, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        return {"control": load_control(self.root / "source" / it["source"], self.size),
                "target": load_target(self.root / "target" / it["target"], self.size),
                "prompt_id": self.prompt_ids[i], "index": i}


def check_files(root: Path, items: list[dict]) -> None:
    for it in items:
        for sub in ("source", "target"):
            p = root / sub / it[sub]
            if not p.is_file():
                raise UserError(f"{p}: image listed in {root / 'prompt.json'} not found")


class Fill50kDataModule(pl.LightningDataModule):
    """The training split with `val_count` items held out (a fixed random choice of --seed) for validation
    loss and sample images. Everything is checked at construction, before any training output exists."""

    def __init__(self, data: str | os.PathLike, size: int, batch_size: int, val_count: int = 8, seed: int = 0,
                 num_workers: int = 0, limit: int | None = None):
        super().__init__()
        self.root = resolve_split(data)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        items = read_prompt_file(self.root / "prompt.json")
        if limit:
            items = items[:limit]
        check_files(self.root, items)
        if len(items) < val_count + batch_size:
            raise UserError(f"{self.root / 'prompt.json'}: {len(items)} lines, need at least --val-count {val_count} "
                            f"+ --batch-size {batch_size}")
        self.prompts = sorted({it["prompt"] for it in items} | {""})  # "" for --proportion-empty-prompts
        index = {p: k for k, p in enumerate(self.prompts)}
        order = np.random.default_rng(seed).permutation(len(items))
        val_idx, train_idx = sorted(order[:val_count]), sorted(order[val_count:])

        def pick(idx):
            return [items[i] for i in idx], [index[items[i]["prompt"]] for i in idx]

        self.train_set = Fill50kDataset(self.root, *pick(train_idx), size)
        self.val_set = Fill50kDataset(self.root, *pick(val_idx), size)
        self.empty_prompt_id = index[""]

    def train_dataloader(self):
        # a fresh permutation from (seed, data epoch) each pass; batches depend on the step alone (common.step_batches)
        return step_batch_loader(self.trainer, BatchStream(self.train_set, self.batch_size, self.seed),
                                 self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=0)
