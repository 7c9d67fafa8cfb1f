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


def adamw_with_schedule(params, *, lr: float, weight_decay: float, warmup_steps: int,
                        cooldown_from: int | None = None, max_steps: int | None = None) -> dict:
    """configure_optimizers()'s answer for AdamW whose rate follows lr_factor (warm-up, constant, optional
    cooldown), stepped per optimiser step. `params`: parameters or parameter groups (a group's own "lr"
    is scaled by the same factor)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, cooldown_from, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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


def devices_and_strategy(devices: str, num_nodes: int = 1) -> tuple[int | str, str]:
    """--devices: 'auto' or a count per node; more than one process in all trains with DDP (one per device)."""
    from common.errors import UserError
    if num_nodes < 1:
        raise UserError(f"--num-nodes must be at least 1, got {num_nodes}")
    if devices == "auto":
        return "auto", ("ddp" if num_nodes > 1 else "auto")
    try:
        n = int(devices)
    except ValueError:
        raise UserError(f"--devices {devices!r}: give a number of devices or 'auto'") from None
    if n < 1:
        raise UserError(f"--devices {devices!r}: must be at least 1")
    return n, ("ddp" if n * num_nodes > 1 else "auto")


def resolve_accelerator(accelerator: str) -> str:
    """--accelerator: 'auto' -> gpu when CUDA is there, else cpu; asking for a GPU that is not there is an error."""
    from common.errors import UserError
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"--accelerator {accelerator}: CUDA is not available on this machine (use --accelerator cpu)")
    return accelerator


def add_trainer_flags(parser, precision_help: str, resume_help: str = "<out>/last.ckpt", num_workers: int = 0) -> None:
    """The flags every trainer shares: --accelerator, --devices, --num-nodes, --precision, --resume,
    --max-minutes, --num-workers, --seed, --quiet.

    `precision_help` says what --precision auto picks for that trainer; `resume_help` where --resume
    without a value looks."""
    from common.device import PRECISIONS
    g = parser.add_argument_group("run")
    g.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"), help="(default: auto)")
    g.add_argument("--devices", default="auto",
                   help="devices per node (more than one process in all runs DDP, batch per device) or 'auto'")
    g.add_argument("--num-nodes", type=int, default=1, help="machines taking part (DDP across nodes; default: 1)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help=precision_help)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help=f"resume from a Lightning checkpoint (no value: {resume_help})")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much wall time (--resume continues)")
    g.add_argument("--num-workers", type=int, default=num_workers,
                   help=f"data-loading worker processes (default: {num_workers})")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the noise (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def make_trainer(args, *, out: Path, precision: str, max_steps: int, checkpoint_every: int, callbacks=(),
                 val_every: int | None = None, limit_val_batches: float = 1.0, log_every_n_steps: int = 25,
                 **trainer_kwargs):
    """The Lightning Trainer every trainer uses, from the shared flags in `args` (add_trainer_flags).

    Writes `<out>/last.ckpt` atomically every `checkpoint_every` optimiser steps and CSV logs to
    `<out>/logs/`; validates every `val_every` steps (None: never). `precision` is Lightning's string
    (common.device.lightning_precision); other pl.Trainer arguments pass through."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    accelerator = resolve_accelerator(args.accelerator)
    devices, strategy = devices_and_strategy(args.devices, args.num_nodes)
    validation = dict(val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=limit_val_batches)
    if val_every is None:
        validation = dict(limit_val_batches=0)
    return pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy, precision=precision,
        max_steps=max_steps, max_time={"minutes": args.max_minutes} if args.max_minutes else None,
        num_sanity_val_steps=0, logger=CSVLogger(out, name="logs"), log_every_n_steps=log_every_n_steps,
        callbacks=[last_checkpoint_callback(out, checkpoint_every), *callbacks], plugins=[AtomicCheckpointIO()],
        enable_model_summary=False, enable_progress_bar=not args.quiet, default_root_dir=out,
        **validation, **trainer_kwargs,
    )
