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
  samples/step_XXXXXX.png  a 10x2 grid (digits x datasets), or 4x8 validation label lists, after every validation
  metrics.csv            losses, from Lightning's CSV logger
On CUDA it trains in bf16 autocast with channels_last; --devices N runs DDP.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from common.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from common.device import lightning_precision, setup_cuda_fast_math  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from common.fileio import check_writable, ensure_dir  # noqa: E402
from common.images import save_grid, to_uint8  # noqa: E402
from common.lightning_utils import EMA, AtomicCheckpointIO, add_trainer_flags, devices_and_strategy, last_checkpoint_callback, lr_factor, resolve_resume  # noqa: E402
from common.schedules import SCHEDULES, alphas_cumprod, make_betas  # noqa: E402
from common.seeding import seed_everything  # noqa: E402
from p1_ddpm.model import CHECKPOINT_KIND, PREDICTIONS, ConditionalUNet, training_target  # noqa: E402
from p1_ddpm.samplers import generate  # noqa: E402


TASKS = ("digits", "iclevr")
TASK_DEFAULTS = {
    "digits": dict(batch_size=128, schedule="linear", channels="48,96", patch_size=2, prediction="eps"),
    # patch 2 into 32 channels: with patch 4 (48 values) into 64 channels the output head cannot pass the
    # noise through (SiLU needs ~2 channels per signed value) and samples stay pure noise (ICLEVR.md).
    # v: the eps model drew tinted, empty floors; 500 v steps from it lifted the validation judge 0.42 -> 0.65
    "iclevr": dict(batch_size=64, schedule="cosine", channels="32,64,128,192", patch_size=2, prediction="v"),
}


class DiffusionModule(pl.LightningModule):
    """Noise (or v) prediction training with condition dropout (for classifier-free guidance) and an EMA copy.

    init_state: weights to start from (--init-from), loaded into the model before the EMA copies it."""

    def __init__(self, model_config: dict, schedule: str = "linear", num_train_steps: int = 1000,
                 lr: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 500, ema_decay: float = 0.999,
                 p_uncond: float = 0.15, p_drop_domain: float = 0.05, channels_last: bool = False,
                 init_state: dict | None = None, cooldown_from: int | None = None, max_steps: int | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["init_state"])
        self.model = ConditionalUNet(**model_config)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.ema = EMA(self.model, ema_decay)
        self.register_buffer("alphas_cumprod", alphas_cumprod(make_betas(schedule, num_train_steps)), persistent=False)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)

    def diffusion_loss(self, model, images: torch.Tensor, cond: torch.Tensor, generator=None) -> torch.Tensor:
        x0 = images.float() / 127.5 - 1.0
        if self.hparams.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        b = x0.shape[0]
        t = torch.randint(0, self.hparams.num_train_steps, (b,), device=self.device, generator=generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        ab = self.alphas_cumprod[t].float()[:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = training_target(x0, noise, ab, model.config["prediction"])
        return F.mse_loss(model(x_t, t, cond).float(), target)

    def training_step(self, batch, batch_idx):
        images, cond = batch
        drop_label = torch.rand(cond.shape[0], device=self.device) < self.hparams.p_uncond
        drop_domain = torch.rand(cond.shape[0], device=self.device) < self.hparams.p_drop_domain
        loss = self.diffusion_loss(self.model, images, self.model.cond.drop(cond, drop_label, drop_domain))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # updated here, not in on_train_batch_end: callbacks (the checkpoint) run before that hook, so a
        # checkpoint taken at step N would miss the EMA update of step N and a resumed run would drift
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    def validation_step(self, batch, batch_idx):
        # the same t and noise for every validation, so losses are comparable across checkpoints
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        images, cond = batch
        loss = self.diffusion_loss(self.ema.module, images, cond, generator=g)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(images))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        h = self.hparams
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, h.warmup_steps, h.cooldown_from, h.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_config(self) -> dict:
        h = self.hparams
        # extra_config: what inference needs beyond the network (i-CLEVR: the objects.json mapping)
        return {"model": self.model.config, "schedule": h.schedule, "num_train_steps": h.num_train_steps,
                **getattr(self, "extra_config", {})}


class ExportAndSample(Callback):
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
        save_checkpoint(self.out / "model.safetensors", ema.state_dict(), CHECKPOINT_KIND, pl_module.export_config(), metrics)
        if val < self.best:
            self.best = val
            save_checkpoint(self.out / "best.safetensors", ema.state_dict(), CHECKPOINT_KIND, pl_module.export_config(), metrics)
        grid_path = self.out / "samples" / f"step_{trainer.global_step:06d}.png"
        ab = pl_module.alphas_cumprod.cpu()
        if self.grid is None:
            num_domains = ema.config["num_domains"]
            cond = torch.tensor([[d, k] for d in range(10) for k in range(num_domains)])
            imgs = generate(ema, cond, range(len(cond)), ab, self.seed, steps=self.grid_steps,
                            guidance=self.guidance, device=pl_module.device)
            save_grid(grid_path, to_uint8(imgs), 10, num_domains, row_labels=[str(d) for d in range(10)], scale=2)
        else:
            cond, rows, cols = self.grid
            imgs = generate(ema, cond, range(len(cond)), ab, self.seed, self.sampler, self.grid_steps,
                            self.guidance, self.eta, device=pl_module.device)
            save_grid(grid_path, to_uint8(imgs), rows, cols)
        if self.judge is not None:
            from scripts.evaluate_iclevr import judge_scores, topk_accuracy
            net, cond = self.judge
            imgs = generate(ema, cond, range(len(cond)), ab, self.seed + 1, self.sampler, self.grid_steps,
                            self.guidance, self.eta, device=pl_module.device)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="digits: MNIST-M + SVHN, (digit, dataset) condition; iclevr: 64x64 multi-label objects")
    p.add_argument("--data", required=True,
                   help="digits: course root holding mnistm/ and svhn/; iclevr: folder with train.json, "
                        "objects.json and the images")
    p.add_argument("--out", required=True, help="output folder (checkpoints, samples, logs)")
    p.add_argument("--datasets", default="mnistm,svhn", help="comma-separated data sets, in condition-index order")
    p.add_argument("--max-steps", type=int, default=20000, help="optimiser steps to train for")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time (resume continues)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (digits), 64 (iclevr)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="AdamW learning rate (after --warmup-steps); --resume keeps the checkpoint's rate")
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--cooldown-from", type=int, default=None, metavar="STEP",
                   help="from this optimiser step the rate falls linearly to 0 at --max-steps (default: constant); "
                        "can be added when resuming a constant-rate run")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.15, help="probability of dropping the digit label (CFG)")
    p.add_argument("--temperature", type=float, default=0.5,
                   help="data set k is drawn with probability ~ size_k**temperature (0 = balanced)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="default: linear (digits), cosine (iclevr)")
    p.add_argument("--channels", default=None, help="UNet widths per resolution level; default: 48,96 (digits), "
                   "32,64,128,192 (iclevr)")
    p.add_argument("--res-blocks", type=int, default=1, help="residual blocks per level")
    p.add_argument("--patch-size", type=int, default=None,
                   help="fold PxP pixels into channels; default: 2 (digits: run at 14x14; iclevr: 32x32)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the UNet predicts: eps (the noise) or v (Salimans & Ho, 2022: its loss keeps weighing x0 "
                        "where the signal is nearly gone; see model.py); default: eps (digits), v (iclevr), or that of --init-from")
    p.add_argument("--init-from", default=None,
                   help="start from these weights (a model/best .safetensors this script wrote) with a fresh optimiser "
                        "and step 0; the architecture (and, unless given, the schedule and prediction) come from that "
                        "file, so --prediction can switch a trained model to v; ignored when --resume finds a checkpoint")
    p.add_argument("--judge", default=None,
                   help="iclevr: a judge checkpoint (scripts/train_iclevr_judge.py) to score validation samples")
    p.add_argument("--judge-samples", type=int, default=64, help="iclevr: validation label lists sampled for --judge")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the validation samples")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradient norm to this (0: off); an i-CLEVR run at lr 5e-4 diverged without it")
    p.add_argument("--val-every", type=int, default=500, help="validate, export and sample every N steps")
    p.add_argument("--limit-val-batches", type=float, default=1.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on CUDA for long runs)")
    add_trainer_flags(p, "auto: bf16 mixed on GPU, fp32 on CPU; bf16 also speeds up CPUs with avx512_bf16/AMX")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    prediction_given, schedule_given = args.prediction, args.schedule
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}")
    if args.cooldown_from is not None and not 0 <= args.cooldown_from < args.max_steps:
        raise UserError(f"--cooldown-from must be in [0, --max-steps={args.max_steps}), got {args.cooldown_from}")
    out = check_writable(args.out)
    seed_everything(args.seed)
    setup_cuda_fast_math()
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UserError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    resume = resolve_resume(args.resume, out)

    grid = judge = None
    sample_settings = {}
    if args.task == "digits":
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        from p1_ddpm.data import DigitsDataModule
        data = DigitsDataModule(args.data, args.batch_size, args.temperature, args.seed, args.num_workers, datasets)
        data.setup()  # decode every image now: a bad file fails here, before any training output exists
        model_config = dict(image_size=28, channels=channels, num_res_blocks=args.res_blocks,
                            attention_levels=(len(channels) - 1,), dropout=args.dropout, condition="digits",
                            num_domains=len(datasets), patch_size=args.patch_size)
    else:
        from p1_ddpm.iclevr_data import IMAGE_SIZE, ICLEVRDataModule
        if args.judge is not None:
            from scripts.evaluate_iclevr import load_own_judge
            judge_net = load_own_judge(args.judge)
        data = ICLEVRDataModule(args.data, args.batch_size, args.seed, args.num_workers)
        data.setup()
        val_cond = data.val_set.cond
        grid = (val_cond[:32], 4, 8) if len(val_cond) >= 32 else (val_cond, 1, len(val_cond))
        if args.judge is not None:
            judge = (judge_net, val_cond[:args.judge_samples])
        # deterministic samplers leave grain on a part-trained model; stochastic DDIM does not
        sample_settings = dict(sampler="ddim", eta=1.0, grid_steps=25)
        # attention on every level but the first: objects must agree on where each one stands
        model_config = dict(image_size=IMAGE_SIZE, channels=channels, num_res_blocks=args.res_blocks,
                            attention_levels=tuple(range(1, len(channels))) or (0,), dropout=args.dropout,
                            condition="multihot", num_labels=len(data.objects), patch_size=args.patch_size)
    model_config["prediction"] = args.prediction
    init_state = None
    if resume is not None:
        # the network and its schedule are the checkpoint's, whatever the flags say now
        try:
            hparams = torch.load(resume, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]
            model_config, saved_schedule = hparams["model_config"], hparams["schedule"]
        except Exception as e:  # a truncated file, another trainer's checkpoint, not a checkpoint at all
            raise UserError(f"{resume}: not a checkpoint of p1_ddpm/train.py ({type(e).__name__}: {e})") from None
        # checkpoints from before --prediction predicted eps
        saved = {"prediction": model_config.get("prediction", "eps"), "schedule": saved_schedule}
        for flag, given in (("prediction", prediction_given), ("schedule", schedule_given)):
            if given not in (None, saved[flag]):
                raise UserError(f"{resume}: was trained with --{flag} {saved[flag]}; --resume cannot change it "
                                f"(start a new --out with --init-from to fine-tune)")
        args.schedule = saved_schedule
    elif args.init_from is not None:
        init_state, init_config = read_checkpoint(args.init_from, CHECKPOINT_KIND)
        if init_config["model"]["condition"] != model_config["condition"]:
            raise UserError(f"{args.init_from}: a {init_config['model']['condition']!r} model, not one for --task {args.task}")
        if args.task == "iclevr" and init_config.get("objects") != data.objects:
            raise UserError(f"{args.init_from}: its object list differs from {args.data}/objects.json")
        model_config = dict(init_config["model"])  # without "prediction" (older files) the UNet's default, eps
        if prediction_given:
            model_config["prediction"] = prediction_given
        args.schedule = schedule_given or init_config.get("schedule", args.schedule)
    ensure_dir(out)
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    module = DiffusionModule(model_config, args.schedule, 1000, args.lr, 0.0, args.warmup_steps, args.ema_decay,
                             args.p_uncond, channels_last=accelerator == "gpu", init_state=init_state,
                             cooldown_from=args.cooldown_from, max_steps=args.max_steps)
    if args.task == "iclevr":
        module.extra_config = {"objects": data.objects}
    if args.compile:
        module.model.compile()  # in place: parameter names (checkpoints, EMA) stay as they are

    ckpt = last_checkpoint_callback(out, args.val_every)
    devices, strategy = devices_and_strategy(args.devices)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, precision=lightning_precision(accelerator, args.precision),
        strategy=strategy,
        max_steps=args.max_steps, max_time={"minutes": args.max_minutes} if args.max_minutes else None,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, limit_val_batches=args.limit_val_batches,
        num_sanity_val_steps=0, logger=CSVLogger(out, name="logs"), log_every_n_steps=25,
        gradient_clip_val=args.grad_clip or None,
        callbacks=[ckpt, ExportAndSample(out, guidance=args.guidance, seed=args.seed, grid=grid, judge=judge,
                                          **sample_settings)], plugins=[AtomicCheckpointIO()],
        enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.is_global_zero:
        print(f"done: {out / 'model.safetensors'} (EMA weights), best by val loss: {out / 'best.safetensors'}")


if __name__ == "__main__":
    main()
