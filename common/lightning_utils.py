"""Lightning pieces shared by the trainers: atomic checkpoint files, the `last.ckpt` callback, an EMA copy of
a model and its per-step update, and the command-line flags every trainer has (devices, precision, resume, seed)."""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, Checkpoint

from common.config import flag_name, float_in, int_at_least
from common.fileio import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed, so an interrupted save never leaves a
    truncated `last.ckpt` that `--resume` would then fail on."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class LastCheckpoint(Checkpoint):
    """Writes `<out>/last.ckpt` every N optimiser steps, at the last step and when the run is stopped early
    (e.g. by --max-minutes), always to that name, at the END of that step: after the step's validation and what
    hangs on it (exports, the best model, sample grids) when one runs, else right after the step.

    Lightning's ModelCheckpoint writes before the step's validation; a run killed between the two and resumed
    skips that validation for good (Lightning counts it as done), so its exports and samples were never made
    and the choice of the best model differed. Written at the end of the step, every checkpoint is one an
    uninterrupted run passes through: resumed from it, a run continues exactly (with batches and noise drawn
    from the step, see common.step_batches and StepSeed)."""

    def __init__(self, out: str | os.PathLike, every_n_train_steps: int):
        self.out, self.every = Path(out), every_n_train_steps
        self._saved_step = None    # the step last.ckpt holds
        self._step_at_start = None  # global_step when the current batch began
        self._pending = False       # this step's checkpoint waits for its validation

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.out / "last.ckpt")
        self._saved_step, self._pending = trainer.global_step, False

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run does not write its starting point again

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[BATCHES_PER_STEP_KEY] = {"world_size": trainer.world_size,
                                            "accumulate": trainer.accumulate_grad_batches}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        check_batches_per_step(checkpoint.get(BATCHES_PER_STEP_KEY), trainer.world_size,
                               trainer.accumulate_grad_batches, trainer.ckpt_path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_at_start or step == self._saved_step:
            return  # no optimiser step in this batch (gradient accumulation), or saved already
        if not (self.every > 0 and step % self.every == 0) and not trainer.should_stop:
            return
        # the very test Lightning's loop makes right after this hook to decide whether to validate now
        # (pytorch-lightning is pinned: requirements.txt)
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._pending = True
        else:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # callbacks that are Checkpoints run after all others: exports and samples of this validation are done
        if self._pending and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # the final step too (max_steps not a multiple of N), or one whose validation did not run after all
        if self._pending or (self._saved_step is not None and trainer.global_step != self._saved_step):
            self.save(trainer)


BATCHES_PER_STEP_KEY = "hw2_batches_per_step"


def check_batches_per_step(saved: dict | None, world_size: int, accumulate: int, ckpt_path) -> None:
    """--resume across a change of processes: a step's batches are the positions step x P .. step x P + P - 1 of the
    run's stream (common.step_batches), P = processes x gradient accumulation. A run with the same P continues
    exactly (the same batches and noise a step; with another split of P between processes and accumulation the
    sum of the gradients is the same up to rounding); with another P it would read batches again or skip some, so
    it is refused. Checkpoints from before this check carry no record and are not checked."""
    from common.errors import UserError
    if not saved:
        return
    was_ws, was_acc = int(saved["world_size"]), int(saved["accumulate"])
    if was_ws * was_acc == world_size * accumulate:
        return
    hint = (f"resume on {was_ws} process(es) (--devices x --num-nodes = {was_ws})" +
            (f", or keep processes x --accumulate = {was_ws * was_acc}" if accumulate > 1 or was_acc > 1 else ""))
    raise UserError(
        f"{ckpt_path}: written by a run of {was_ws} process(es) x {was_acc} accumulated batch(es) = "
        f"{was_ws * was_acc} batches a step; this run has {world_size} x {accumulate} = {world_size * accumulate}. "
        f"Every step's batches and noise are counted in those positions, so it cannot continue that run: {hint}")


def last_checkpoint_callback(out: str | os.PathLike, every_n_train_steps: int) -> LastCheckpoint:
    """The `<out>/last.ckpt` writer of every trainer (see LastCheckpoint)."""
    return LastCheckpoint(out, every_n_train_steps)


class StepSeed(Callback):
    """Seeds torch's global generators (CPU and every CUDA device) before each training batch from (seed,
    position) alone: position = the run's batch index x world size + rank, counted from the start of training
    and restored by --resume. So the noise, timesteps, dropout masks and condition dropout a training step
    draws from the global generators are the same in a resumed run as in an uninterrupted one, and differ
    between ranks."""

    def __init__(self, seed: int):
        self.seed = seed
        self._batch = 0  # the run's batch index b, as common.step_batches counts it

    def on_train_start(self, trainer, pl_module) -> None:
        self._batch = trainer.global_step * trainer.accumulate_grad_batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from common.step_batches import NOISE, derived_seed
        position = self._batch * trainer.world_size + trainer.global_rank
        self._batch += 1
        torch.manual_seed(derived_seed(self.seed, NOISE, position))


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied).

    decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # the count as a Python int too: reading the buffer each step would make the CPU wait for a GPU
        # every step; read once after construction or a load (None = not read yet)
        self._count: int | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self._count is None:
            self._count = int(self.num_updates)
        n = self._count
        d = min(self.decay, (1 + n) / (10 + n))
        ema = list(self.module.parameters())
        # one fused kernel for all parameters on CUDA (a loop launched one per tensor); the same lerp on the CPU
        torch._foreach_lerp_(ema, [p.detach().to(e.dtype) for e, p in zip(ema, model.parameters())], 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1
        self._count += 1


class UpdateEmaEachStep:
    """LightningModule mixin (listed before pl.LightningModule): after every optimiser step, `self.ema` (an EMA,
    or None for none) takes in the weights of `self.ema_source()`. Done in optimizer_step, not in
    on_train_batch_end: the checkpoint callback runs before that hook, so a checkpoint of step N would miss
    step N's update and a resumed run would drift from an uninterrupted one."""

    def ema_source(self) -> torch.nn.Module:
        raise NotImplementedError

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.ema_source())


def lr_factor(step: int, warmup_steps: int, cooldown_from: int | None = None, max_steps: int | None = None) -> float:
    """Multiplier of the learning rate at optimiser step `step`: linear warm-up, constant, then (from
    cooldown_from, P1's --cooldown-from) a linear fall to 0 at max_steps. A cooldown at the end of a
    constant-rate run usually lands lower than stopping at the constant rate; since the factor is a function
    of the step alone, a constant-rate run can be resumed into one."""
    factor = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_from is not None and step >= cooldown_from:
        factor *= max(0.0, (max_steps - step) / max(1, max_steps - cooldown_from))
    return factor


def check_cooldown(cooldown_from: int | None, max_steps: int) -> None:
    """--cooldown-from, when given, must fall inside the run: [0, --max-steps)."""
    from common.errors import UserError
    if cooldown_from is not None and not 0 <= cooldown_from < max_steps:
        raise UserError(f"--cooldown-from must be in [0, --max-steps={max_steps}), got {cooldown_from}")


def adamw_with_schedule(params, *, lr: float, weight_decay: float, warmup_steps: int,
                        cooldown_from: int | None = None, max_steps: int | None = None) -> dict:
    """configure_optimizers()'s answer for AdamW whose rate follows lr_factor (warm-up, constant, optional
    cooldown), stepped per optimiser step. `params`: parameters or parameter groups (a group's own "lr"
    is scaled by the same factor)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, cooldown_from, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """--resume: None -> fresh start; 'auto' -> out/last.ckpt when it exists (else a fresh start, said on
    stderr: a mistyped --out would otherwise start over without a word); else a path that must exist."""
    from common.errors import UserError
    if resume is None:
        return None
    if resume == "auto":
        last = out / "last.ckpt"
        if not last.is_file():
            print(f"note: --resume: no {last} yet, so this is a new run", file=sys.stderr)
            return None
        return str(last)
    if not os.path.isfile(resume):
        raise UserError(f"{resume}: --resume checkpoint not found")
    return resume


def devices_and_strategy(devices: int | str, num_nodes: int = 1) -> tuple[int | str, str]:
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
    return "gpu" if accelerator == "cuda" else accelerator  # cuda: the word the other commands' --device uses


def count_or_auto(low: int):
    """argparse type of a count flag that also takes 'auto' (--devices, at least 1; --num-workers, at least 0):
    checked when parsed, so a wrong value is argparse's one-line error on every machine (a GPU box reads
    --devices in resolve_num_workers before Lightning would)."""
    count = int_at_least(low)

    def parse(value: str) -> int | str:
        if value == "auto":
            return value
        try:
            return count(value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"give a count or 'auto': {e}") from None
    parse.__name__ = "count or auto"
    return parse


def resolve_num_workers(args, decodes: bool = True) -> int:
    """--num-workers auto (set args.num_workers to the count): 0 on the CPU, where the loader's workers take cores
    from the training itself (scripts/bench_loader.py), and for data held in memory (decodes=False: P1's digits,
    whose batches the main process collates faster than workers hand them over); on CUDA the cores this process
    has, less one for itself, at most 6: SLURM's --cpus-per-task when set, else the cores this process may run
    on shared by the node's processes (--devices)."""
    if args.num_workers != "auto":
        return args.num_workers
    workers = 0
    if decodes and resolve_accelerator(args.accelerator) == "gpu":
        if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
            cores = int(os.environ["SLURM_CPUS_PER_TASK"])
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            per_node = torch.cuda.device_count() if args.devices == "auto" else int(args.devices)
            cores //= max(1, per_node)
        workers = max(0, min(6, cores - 1))
    args.num_workers = workers
    return workers


def add_trainer_flags(parser, precision_help: str, resume_help: str = "<out>/last.ckpt",
                      num_workers: int | str = "auto", resume_may_change: tuple[str, ...] = ()) -> None:
    """The flags every trainer shares: --accelerator, --devices, --num-nodes, --precision, --resume,
    --max-minutes, --num-workers, --seed, --quiet.

    `precision_help` says what --precision auto picks for that trainer; `resume_help` where --resume
    without a value looks; `resume_may_change` the config fields a resumed run may change
    (`common.config.resumed_config`)."""
    from common.device import PRECISIONS
    g = parser.add_argument_group("run")
    g.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"),
                   help="where to train: auto = gpu when CUDA is there, else cpu; gpu and cuda are the same "
                        "(--devices says how many; default: auto)")
    g.add_argument("--devices", type=count_or_auto(1), default="auto",
                   help="devices per node (more than one process in all runs DDP, batch per device) or 'auto'")
    g.add_argument("--num-nodes", type=int_at_least(1), default=1,
                   help="machines taking part (DDP across nodes; default: 1)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help=precision_help)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help=f"resume from a Lightning checkpoint (no value: {resume_help}); the run goes on with the "
                        f"checkpoint's settings: a flag not given takes its value, and a flag given may differ "
                        f"from it only for "
                        + (", ".join(flag_name(n) for n in resume_may_change) or "none"))
    g.add_argument("--max-minutes", type=float_in(0, low_open=True), default=None, metavar="MINUTES",
                   help="stop after this much training wall time in all: a --resume'd run counts the time "
                        "before it too (Lightning's Timer is checkpointed), so raise it to continue")
    g.add_argument("--num-workers", type=count_or_auto(0), default=num_workers,
                   help=f"data-loading worker processes per process, or auto: 0 on CPU, on CUDA the process's share "
                        f"of the cores less one, at most 6 (default: {num_workers})")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the noise (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def make_trainer(args, *, out: Path, precision: str, max_steps: int, checkpoint_every: int, callbacks=(),
                 val_every: int | None = None, limit_val_batches: float = 1.0, log_every_n_steps: int = 25,
                 seed_steps: bool = False, **trainer_kwargs):
    """The Lightning Trainer every trainer uses, from the shared flags in `args` (add_trainer_flags).

    Writes `<out>/last.ckpt` atomically every `checkpoint_every` optimiser steps, at the end of the step
    (LastCheckpoint), and CSV logs to `<out>/logs/`; validates every `val_every` steps (None: never).
    seed_steps: seed the global generators before each batch from --seed and the batch's position (StepSeed);
    with a common.step_batches loader, a resumed run then ends bit-identical to an uninterrupted one.
    `precision` is Lightning's string (common.device.lightning_precision); other pl.Trainer arguments pass
    through.

    Under DDP every rank validates on the whole validation set, so the numbers (and the best checkpoint they
    choose) are the one-process ones: Lightning's DistributedSampler would pad each rank's share with repeats,
    counting some items twice. The training loaders (common.step_batches) shard themselves by rank."""
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
        callbacks=[last_checkpoint_callback(out, checkpoint_every), *([StepSeed(args.seed)] if seed_steps else []),
                   *callbacks],
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False, enable_progress_bar=not args.quiet, default_root_dir=out,
        use_distributed_sampler=False,
        **validation, **trainer_kwargs,
    )
