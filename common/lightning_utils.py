"""Lightning pieces shared by the trainers: atomic checkpoint files, the `last.ckpt` callback, an EMA copy of
a model, and the command-line flags every trainer has (devices, precision, resume, seed)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from common.fileio import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed, so an interrupted save never leaves a
    truncated `last.ckpt` that `--resume` would then fail on."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def last_checkpoint_callback(out: str | os.PathLike, every_n_train_steps: int):
    """Writes `<out>/last.ckpt` every N optimiser steps, always to that name.

    Lightning's version counter would write `last-v1.ckpt` beside an existing `last.ckpt` whenever the
    callback's saved state is not restored, which happens when a run is resumed with another save interval
    (Lightning keys that state by the interval); `--resume` would then silently read the stale `last.ckpt`."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    return ModelCheckpoint(dirpath=out, filename="step{step:06d}", save_last=True, save_top_k=0,
                           every_n_train_steps=every_n_train_steps, auto_insert_metric_name=False,
                           enable_version_counter=False)


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied).

    decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1


def lr_factor(step: int, warmup_steps: int, cooldown_from: int | None = None, max_steps: int | None = None) -> float:
    """Multiplier of the learning rate at optimiser step `step`: linear warm-up, constant, then (from
    cooldown_from, P1's --cooldown-from) a linear fall to 0 at max_steps. A cooldown at the end of a
    constant-rate run usually lands lower than stopping at the constant rate; since the factor is a function
    of the step alone, a constant-rate run can be resumed into one."""
    factor = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_from is not None and step >= cooldown_from:
        factor *= max(0.0, (max_steps - step) / max(1, max_steps - cooldown_from))
    return factor


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """--resume: None -> fresh start; 'auto' -> out/last.ckpt when it exists; else a path that must exist."""
    from common.errors import UserError
    if resume is None:
        return None
    if resume == "auto":
        last = out / "last.ckpt"
        return str(last) if last.is_file() else None
    if not os.path.isfile(resume):
        raise UserError(f"{resume}: --resume checkpoint not found")
    return resume


def devices_and_strategy(devices: str) -> tuple[int | str, str]:
    """--devices: 'auto' or a count; more than one device trains with DDP (one process per device)."""
    from common.errors import UserError
    if devices == "auto":
        return "auto", "auto"
    try:
        n = int(devices)
    except ValueError:
        raise UserError(f"--devices {devices!r}: give a number of devices or 'auto'") from None
    if n < 1:
        raise UserError(f"--devices {devices!r}: must be at least 1")
    return n, ("ddp" if n > 1 else "auto")


def add_trainer_flags(parser, precision_help: str, resume_help: str = "<out>/last.ckpt", num_workers: int = 0) -> None:
    """The flags every trainer shares: --accelerator, --devices, --precision, --resume, --num-workers, --seed.

    `precision_help` says what --precision auto picks for that trainer; `resume_help` where --resume
    without a value looks."""
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    parser.add_argument("--devices", default="auto", help="number of devices (N > 1 runs DDP, batch per device) or 'auto'")
    parser.add_argument("--precision", choices=("auto", "32", "bf16"), default="auto", help=precision_help)
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help=f"resume from a Lightning checkpoint (no value: {resume_help})")
    parser.add_argument("--num-workers", type=int, default=num_workers, help="data-loading worker processes")
    parser.add_argument("--seed", type=int, default=0)
