"""A toy run through common.lightning_utils.make_trainer, to check what validation sees under DDP
(tests/test_common_io.py). Test-only.

    python tests/ddp_validation.py RECORD DEVICES

Trains one step on DEVICES CPU processes. The validation set holds the 5 numbers 0..4; validation logs their mean
the way the trainers log their metrics (on_epoch, sync_dist, weighted by batch size), and how many items this rank
saw. Rank 0 writes {"mean": ..., "seen": ...} to RECORD. The one-process answer is mean 2.0, seen 5; a padding
DistributedSampler would give 5 ranks' worth of items as 6 (10 / 6 = 1.67).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.lightning_utils import make_trainer  # noqa: E402


class OneBatch(IterableDataset):
    def __iter__(self):
        yield torch.ones(2, 1)


class Toy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def training_step(self, batch, batch_idx):
        return (batch * self.w).sum()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.seen += len(x)
        self.log("val_mean", x.mean(), on_epoch=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(OneBatch(), batch_size=None)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(5, dtype=torch.float32)), batch_size=2)


def main() -> None:
    record, devices = Path(sys.argv[1]), sys.argv[2]
    args = argparse.Namespace(accelerator="cpu", devices=devices, num_nodes=1, max_minutes=None, seed=0, quiet=True)
    model = Toy()
    trainer = make_trainer(args, out=record.parent / "run", precision="32-true", max_steps=1, checkpoint_every=1,
                           val_every=1)
    trainer.fit(model)
    if trainer.global_rank == 0:
        record.write_text(json.dumps({"mean": float(trainer.callback_metrics["val_mean"]), "seen": model.seen}))


if __name__ == "__main__":
    main()
