#!/usr/bin/env python
"""Train the class-conditional DDPM on the union of MNIST-M and SVHN (course layout), or (--task iclevr)
the multi-label i-CLEVR variant.

    python p1_ddpm/train.py --data hw2_data/digits --out runs/p1 --max-steps 8000
    python p1_ddpm/train.py --task iclevr --data runs/iclevr/data --out runs/iclevr/ddpm --max-minutes 90

digits: reads <data>/{mnistm,svhn}/{train,val}.csv + data/*.png.
iclevr: reads <data>/train.json, <data>/objects.json and the images (in <data>/images/ or <data>),
  resized to 64x64 (p1_ddpm/render_iclevr.py writes such a folder); a validation split is cut from
  train.json. The condition is the 24-way multi-hot vector; --judge scores samples of the
  validation label lists with a multi-label judge after every validation (judge_acc in the log).
Writes to --out:
  last.ckpt              Lightning checkpoint (model, EMA, optimiser) for --resume
  model.safetensors/json EMA weights + config after every validation (what infer.py loads)
  best.safetensors/json  EMA weights with the lowest validation loss (fixed noise), for model choice
  best_judge.safetensors/json  with --judge: EMA weights with the best judge accuracy
  samples/step_XXXXXX.png  a 10x2 grid (digits x datasets), or 4x8 validation label lists, after every validation
  logs/version_N/metrics.csv  losses (and judge_acc), from Lightning's CSV logger
On CUDA it trains in bf16 autocast with channels_last; --devices N runs DDP.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from common.checkpoint import note_if_finished, read_checkpoint, read_resume_checkpoint, save_checkpoint
from common.config import (
    AT_LEAST_1,
    BELOW_1,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    HelpFormatter,
    add_config_flags,
    config_from_args,
    explicit_flags,
    pre_parse,
    resumed_args,
    resumed_config,
)
from common.device import lightning_precision, setup_cuda_fast_math
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir
from common.images import save_grid, to_uint8
from common.lightning_utils import (
    EMA,
    UpdateEmaEachStep,
    adamw_with_schedule,
    add_trainer_flags,
    check_cooldown,
    make_trainer,
    resolve_accelerator,
    resolve_num_workers,
    resolve_resume,
)
from common.schedules import PREDICTIONS, SCHEDULES, alphas_cumprod, make_betas, training_target
from common.seeding import seed_everything, validation_generator
from p1_ddpm.model import CHECKPOINT_KIND, ConditionalUNet
from p1_ddpm.samplers import sample_conditional_images

TASKS = ("digits", "iclevr")
PROGRAM = "p1_ddpm/train.py"
# what a --resume may change: how long the run goes on and how it validates (not what or how it trains)
RESUME_MAY_CHANGE = ("max_steps", "cooldown_from", "val_every", "limit_val_batches", "guidance", "judge_samples")


@dataclass(frozen=True)
class P1TrainConfig:
    """Every hyper-parameter of a P1 training run: the flags of this script, saved in last.ckpt and in the
    exported model's JSON. TASK_CONFIGS holds each task's values."""

    max_steps: int = field(default=20000, metadata={"range": AT_LEAST_1, "help": "optimiser steps to train for"})
    batch_size: int = field(default=128, metadata={"range": AT_LEAST_1, "help": "images per step (per device)"})
    lr: float = field(default=3e-4, metadata={
        "range": NON_NEGATIVE,
        "help": "AdamW learning rate (after --warmup-steps)"})
    weight_decay: float = field(default=0.0, metadata={"range": NON_NEGATIVE, "help": "AdamW weight decay"})
    warmup_steps: int = field(default=500, metadata={
        "range": NON_NEGATIVE, "help": "linear warm-up of the rate over these steps"})
    cooldown_from: int | None = field(default=None, metadata={
        "metavar": "STEP", "help": "from this optimiser step the rate falls linearly to 0 at --max-steps "
                                   "(none: constant); can be added when resuming a constant-rate run"})
    ema_decay: float = field(default=0.999, metadata={
        "range": BELOW_1, "help": "EMA of the weights that is validated and exported"})
    p_uncond: float = field(default=0.15, metadata={
        "range": SHARE, "help": "probability of dropping the label (for CFG)"})
    p_drop_domain: float = field(default=0.05, metadata={
        "range": SHARE, "help": "digits: probability of also dropping the data set condition"})
    grad_clip: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE,
        "help": "clip the gradient norm to this (0: off); an i-CLEVR run at lr 5e-4 diverged without it"})
    schedule: str = field(default="linear", metadata={"choices": SCHEDULES, "help": "noise schedule"})
    num_train_steps: int = field(default=1000, metadata={
        "range": AT_LEAST_1, "help": "diffusion steps T of the schedule"})
    prediction: str = field(default="eps", metadata={
        "choices": PREDICTIONS,
        "help": "what the UNet predicts: eps (the noise) or v (Salimans & Ho, 2022: its loss keeps weighing x0 "
                "where the signal is nearly gone; see model.py); with --init-from, unless given, the file's"})
    channels: str = field(default="48,96", metadata={"help": "UNet widths per resolution level"})
    res_blocks: int = field(default=1, metadata={"range": AT_LEAST_1, "help": "residual blocks per level"})
    patch_size: int = field(default=2, metadata={"range": AT_LEAST_1, "help": "fold PxP pixels into channels"})
    dropout: float = field(default=0.0, metadata={"range": BELOW_1, "help": "dropout in the residual blocks"})
    datasets: str = field(default="mnistm,svhn", metadata={
        "help": "digits: comma-separated data sets, in condition-index order"})
    temperature: float = field(default=0.5, metadata={
        "range": NON_NEGATIVE,
        "help": "digits: data set k is drawn with probability ~ size_k**temperature (0 = balanced)"})
    val_every: int = field(default=500, metadata={
        "range": AT_LEAST_1, "help": "validate, export and sample every N steps"})
    limit_val_batches: float = field(default=1.0, metadata={
        "range": POSITIVE, "help": "validation batches: a share up to 1 (0.25: a quarter), or a whole count above 1"})
    guidance: float = field(default=3.0, metadata={"help": "guidance scale of the validation samples"})
    judge_samples: int = field(default=64, metadata={
        "range": AT_LEAST_1, "help": "iclevr: validation label lists sampled for --judge"})

    def val_batches(self) -> float | int:
        """--limit-val-batches as Lightning reads it: a float is a share (at most 1), an int a count."""
        v = self.limit_val_batches
        if v <= 1:
            return v
        if not float(v).is_integer():
            raise UserError(f"--limit-val-batches: a share up to 1 or a whole count of batches, got {v}")
        return int(v)

    def channel_tuple(self) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in self.channels.split(","))
        except ValueError:
            raise UserError(f"--channels must be comma-separated integers, got {self.channels!r}") from None


TASK_CONFIGS = {
    "digits": P1TrainConfig(),
    # patch 2 into 32 channels: with patch 4 (48 values) into 64 channels the output head cannot pass the
    # noise through (SiLU needs ~2 channels per signed value) and samples stay pure noise (ICLEVR.md).
    # v: the eps model drew tinted, empty floors; 500 v steps from it lifted the validation judge 0.42 -> 0.65
    "iclevr": P1TrainConfig(batch_size=64, schedule="cosine", channels="32,64,128,192", patch_size=2,
                            prediction="v"),
}


class DiffusionModule(UpdateEmaEachStep, pl.LightningModule):
    """Noise (or v) prediction training with condition dropout (for classifier-free guidance) and an EMA copy.

    init_state: weights to start from (--init-from), loaded into the model before the EMA copies it."""

    def __init__(self, *, model_config: dict, train: dict, channels_last: bool = False,
                 init_state: dict | None = None, seed: int | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["init_state"])
        self.config = P1TrainConfig(**train)
        self.model = ConditionalUNet(**model_config)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.ema = EMA(self.model, self.config.ema_decay)
        ab = alphas_cumprod(make_betas(self.config.schedule, self.config.num_train_steps))
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)

    def diffusion_loss(self, model, images: torch.Tensor, cond: torch.Tensor, generator=None) -> torch.Tensor:
        x0 = images.float() / 127.5 - 1.0
        if self.hparams.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        b = x0.shape[0]
        t = torch.randint(0, self.config.num_train_steps, (b,), device=self.device, generator=generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        ab = self.alphas_cumprod[t].float()[:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = training_target(x0, noise, ab, model.config["prediction"])
        return F.mse_loss(model(x_t, t, cond).float(), target)

    def training_step(self, batch, batch_idx):
        images, cond = batch
        drop_label = torch.rand(cond.shape[0], device=self.device) < self.config.p_uncond
        drop_domain = torch.rand(cond.shape[0], device=self.device) < self.config.p_drop_domain
        loss = self.diffusion_loss(self.model, images, self.model.cond.drop(cond, drop_label, drop_domain))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def ema_source(self):
        return self.model

    def validation_step(self, batch, batch_idx):
        g = validation_generator(batch_idx, self.device)
        images, cond = batch
        loss = self.diffusion_loss(self.ema.module, images, cond, generator=g)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(images))

    def configure_optimizers(self):
        c = self.config
        return adamw_with_schedule(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                   warmup_steps=c.warmup_steps, cooldown_from=c.cooldown_from,
                                   max_steps=c.max_steps)

    def export_config(self) -> dict:
        c = self.config
        # extra_config: what inference needs beyond the network (i-CLEVR: the objects.json mapping)
        return {"model": self.model.config, "schedule": c.schedule, "num_train_steps": c.num_train_steps,
                **getattr(self, "extra_config", {}), "train": dataclasses.asdict(c), "seed": self.hparams.seed}


class ExportEmaAndSampleGrid(Callback):
    """After each validation (rank 0): export EMA weights, keep the best by val loss, draw a sample grid.

    grid: None for the digits' 10 x datasets grid, else (multi-hot conditions, rows, cols) to sample.
    judge: (network, conditions) to score samples of those conditions with (i-CLEVR); the EMA weights
    with the best judge accuracy are kept as best_judge.safetensors.
    sampler, eta: the validation sampler (i-CLEVR uses stochastic DDIM: see ICLEVR.md).
    """

    def __init__(self, out: Path, grid_steps: int = 12, guidance: float = 3.0, seed: int = 0, grid=None, judge=None,
                 sampler: str = "dpmpp2m", eta: float = 0.0):
        self.out, self.grid_steps, self.guidance, self.seed = out, grid_steps, guidance, seed
        self.grid, self.judge, self.sampler, self.eta = grid, judge, sampler, eta
        self.best = math.inf
        self.best_judge = -math.inf

    def state_dict(self):
        return {"best": self.best, "best_judge": self.best_judge}

    def load_state_dict(self, state):
        self.best = state.get("best", math.inf)
        self.best_judge = state.get("best_judge", -math.inf)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val_loss")
        val = float(val) if val is not None else math.nan
        metrics = {"val_loss": val, "global_step": trainer.global_step, "epoch": trainer.current_epoch}
        ema = pl_module.ema.module
        save_checkpoint(
            self.out / "model.safetensors", ema.state_dict(), CHECKPOINT_KIND, pl_module.export_config(), metrics
        )
        if val < self.best:
            self.best = val
            save_checkpoint(
                self.out / "best.safetensors", ema.state_dict(), CHECKPOINT_KIND, pl_module.export_config(), metrics
            )
        grid_path = self.out / "samples" / f"step_{trainer.global_step:06d}.png"
        ab = pl_module.alphas_cumprod.cpu()
        if self.grid is None:
            num_domains = ema.config["num_domains"]
            cond = torch.tensor([[d, k] for d in range(10) for k in range(num_domains)])
            imgs = sample_conditional_images(ema, cond, range(len(cond)), ab, self.seed, steps=self.grid_steps,
                                             guidance=self.guidance, device=pl_module.device)
            save_grid(grid_path, to_uint8(imgs), 10, num_domains, row_labels=[str(d) for d in range(10)], scale=2)
        else:
            cond, rows, cols = self.grid
            imgs = sample_conditional_images(ema, cond, range(len(cond)), ab, self.seed, self.sampler,
                                             self.grid_steps, self.guidance, self.eta, device=pl_module.device)
            save_grid(grid_path, to_uint8(imgs), rows, cols)
        if self.judge is not None:
            from p1_ddpm.iclevr_judge import judge_scores, topk_accuracy
            net, cond = self.judge
            imgs = sample_conditional_images(ema, cond, range(len(cond)), ab, self.seed + 1, self.sampler,
                                             self.grid_steps, self.guidance, self.eta, device=pl_module.device)
            hits, total = topk_accuracy(judge_scores(net, torch.from_numpy(to_uint8(imgs)).permute(0, 3, 1, 2)), cond)
            acc = hits / total
            metrics["judge_acc"] = acc
            print(f"step {trainer.global_step}: val_loss {val:.4f}, judge accuracy of {len(cond)} samples {acc:.4f}",
                  flush=True)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"judge_acc": acc}, step=trainer.global_step)
            if acc > self.best_judge:
                self.best_judge = acc
                save_checkpoint(self.out / "best_judge.safetensors", ema.state_dict(), CHECKPOINT_KIND,
                                pl_module.export_config(), metrics)


def build_parser(task: str = "digits") -> argparse.ArgumentParser:
    """The flags of `task`; the hyper-parameters' defaults shown by --help are that task's (TASK_CONFIGS)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="digits: MNIST-M + SVHN, (digit, dataset) condition; iclevr: 64x64 multi-label objects. "
                        "The defaults below are those of --task " + task)
    p.add_argument("--data", required=True,
                   help="digits: course root holding mnistm/ and svhn/; iclevr: folder with train.json, "
                        "objects.json and the images")
    p.add_argument("--out", required=True, help="output folder (checkpoints, samples, logs)")
    p.add_argument("--init-from", default=None,
                   help="start from these weights (a model/best .safetensors this script wrote) with a fresh optimiser "
                        "and step 0; the architecture (and, unless given, the schedule and prediction) come from that "
                        "file, so --prediction can switch a trained model to v; ignored when --resume finds a "
                        "checkpoint")
    p.add_argument("--judge", default=None,
                   help="iclevr: a judge checkpoint (scripts/train_iclevr_judge.py) to score validation samples")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on CUDA for long runs)")
    add_config_flags(p, TASK_CONFIGS[task], f"hyper-parameters (defaults of --task {task})")
    add_trainer_flags(p, "auto: bf16 mixed on GPUs from Ampere on, else fp32; bf16 also speeds up CPUs with "
                         "avx512_bf16/AMX",
                      resume_may_change=RESUME_MAY_CHANGE)
    return p


def parse_config(argv) -> tuple[argparse.Namespace, P1TrainConfig, set[str]]:
    """The parsed flags, the run's config (the task's defaults, overridden by the flags given) and the names
    of the flags given on the command line."""
    task = pre_parse(argv, ("--task", "digits")).task
    task = task if task in TASKS else "digits"  # an unknown task is reported by the full parser
    args = build_parser(task).parse_args(argv)
    resolve_num_workers(args, decodes=args.task == "iclevr")  # the digits are held in memory
    config = config_from_args(TASK_CONFIGS[args.task], args)
    return args, config, explicit_flags(lambda: build_parser(args.task), argv)


def model_config_for(task: str, config: P1TrainConfig, data) -> dict:
    channels = config.channel_tuple()
    if task == "digits":
        return dict(image_size=28, channels=channels, num_res_blocks=config.res_blocks,
                    attention_levels=(len(channels) - 1,), dropout=config.dropout, condition="digits",
                    num_domains=len(data.datasets), patch_size=config.patch_size, prediction=config.prediction)
    from p1_ddpm.iclevr_data import IMAGE_SIZE
    # attention on every level but the first: objects must agree on where each one stands
    return dict(image_size=IMAGE_SIZE, channels=channels, num_res_blocks=config.res_blocks,
                attention_levels=tuple(range(1, len(channels))) or (0,), dropout=config.dropout,
                condition="multihot", num_labels=len(data.objects), patch_size=config.patch_size,
                prediction=config.prediction)


def check_geometry(model_config: dict) -> None:
    """The image side must split into --patch-size patches and then halve at every level but the last (the
    UNet's skips join same-size maps): a one-line UserError instead of a shape traceback at the first step."""
    side, patch, levels = model_config["image_size"], model_config["patch_size"], len(model_config["channels"])
    if side % patch or (side // patch) % 2 ** (levels - 1):
        raise UserError(f"--patch-size {patch} and {levels} levels of --channels do not fit {side}-px images: "
                        f"{side} must be a multiple of {patch} x 2^{levels - 1} (e.g. --patch-size 2 with two "
                        f"levels for 28 px)")


@cli_main
def main(argv=None) -> None:
    args, config, given = parse_config(argv)
    out = check_writable(args.out)
    setup_cuda_fast_math()
    config.channel_tuple()
    config.val_batches()
    resume = resolve_resume(args.resume, out)
    resumed_model = None
    if resume is not None:  # read now: the data, the network and its schedule are the checkpoint's
        resume_ckpt = read_resume_checkpoint(resume, PROGRAM, ("model_config", "train"))
        hparams = resume_ckpt["hyper_parameters"]
        resumed_model = hparams["model_config"]
        condition = "digits" if args.task == "digits" else "multihot"
        if not isinstance(resumed_model, dict) or resumed_model.get("condition") != condition:
            raise UserError(f"{resume}: not a checkpoint of {PROGRAM} --task {args.task}")
        config = resumed_config(config, hparams["train"], given, may_change=RESUME_MAY_CHANGE, source=resume,
                                program=PROGRAM)
        # checkpoints from before the seed was saved do not say
        resumed_args(args, {"seed": hparams["seed"]} if hparams.get("seed") is not None else {}, given,
                     source=resume)
        note_if_finished(resume, resume_ckpt, config.max_steps)
        del resume_ckpt
    check_cooldown(config.cooldown_from, config.max_steps)
    seed_everything(args.seed)

    grid = judge = None
    sample_settings = {}
    if args.task == "digits":
        datasets = [d.strip() for d in config.datasets.split(",") if d.strip()]
        from p1_ddpm.data import DigitsDataModule
        data = DigitsDataModule(args.data, batch_size=config.batch_size, temperature=config.temperature,
                                seed=args.seed, num_workers=args.num_workers, datasets=datasets)
        data.setup()  # decode every image now: a bad file fails here, before any training output exists
    else:
        from p1_ddpm.iclevr_data import ICLEVRDataModule
        if args.judge is not None:
            from p1_ddpm.iclevr_judge import load_own_judge
            judge_net = load_own_judge(args.judge)
        data = ICLEVRDataModule(args.data, batch_size=config.batch_size, seed=args.seed,
                                num_workers=args.num_workers)
        data.setup()
        val_cond = data.val_set.cond
        grid = (val_cond[:32], 4, 8) if len(val_cond) >= 32 else (val_cond, 1, len(val_cond))
        if args.judge is not None:
            judge = (judge_net, val_cond[:config.judge_samples])
        # deterministic samplers leave grain on a part-trained model; stochastic DDIM does not
        sample_settings = dict(sampler="ddim", eta=1.0, grid_steps=25)
    model_config = model_config_for(args.task, config, data)
    check_geometry(model_config)
    init_state = None
    if resumed_model is not None:
        model_config = resumed_model
    elif args.init_from is not None:
        init_state, init_config = read_checkpoint(args.init_from, CHECKPOINT_KIND)
        if init_config["model"]["condition"] != model_config["condition"]:
            raise UserError(
                f"{args.init_from}: a {init_config['model']['condition']!r} model, not one for --task {args.task}"
            )
        if args.task == "iclevr" and init_config.get("objects") != data.objects:
            raise UserError(f"{args.init_from}: its object list differs from {args.data}/objects.json")
        model_config = dict(init_config["model"])
        model_config.setdefault("prediction", "eps")  # files from before --prediction predicted eps
        if "prediction" in given:
            model_config["prediction"] = config.prediction
        schedule = config.schedule if "schedule" in given else init_config.get("schedule", config.schedule)
        config = dataclasses.replace(config, prediction=model_config["prediction"], schedule=schedule)
    ensure_dir(out)
    accelerator = resolve_accelerator(args.accelerator)
    module = DiffusionModule(model_config=model_config, train=dataclasses.asdict(config),
                             channels_last=accelerator == "gpu", init_state=init_state, seed=args.seed)
    if args.task == "iclevr":
        module.extra_config = {"objects": data.objects}
    if args.compile:
        module.model.compile()  # in place: parameter names (checkpoints, EMA) stay as they are

    sampler = ExportEmaAndSampleGrid(out, guidance=config.guidance, seed=args.seed, grid=grid, judge=judge,
                                     **sample_settings)
    trainer = make_trainer(args, out=out, precision=lightning_precision(accelerator, args.precision),
                           max_steps=config.max_steps, checkpoint_every=config.val_every, callbacks=[sampler],
                           val_every=config.val_every, limit_val_batches=config.val_batches(),
                           gradient_clip_val=config.grad_clip or None, seed_steps=True)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.global_step == config.max_steps and config.max_steps % config.val_every:
        # a last step off the --val-every grid: validated (and exported) too, as an uninterrupted run would be
        trainer.validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        if (out / "model.safetensors").is_file():
            print(f"done: {out / 'model.safetensors'} (EMA weights), best by val loss: {out / 'best.safetensors'}")
        else:  # stopped (--max-minutes) before its first validation, which is what exports
            print(f"stopped before the first validation: nothing exported yet; continue with --resume ({out})")


if __name__ == "__main__":
    main()
