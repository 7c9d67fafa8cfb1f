#!/usr/bin/env python
"""Train a digit classifier across domains: on the source only, with DANN, or on the target only.

    python p4_dann/train.py --source mnistm --target usps --mode dann --data hw2_data/digits --out runs/p4/usps_dann

Modes: `source` (labelled source; the lower bound), `dann` (labelled source + unlabelled target, with
the domain classifier behind a gradient-reversal layer whose coefficient follows 2/(1+exp(-10p))-1
over training progress p), `target` (labelled target; the upper bound). Learning rate: SGD with
momentum, annealed as lr0 / (1 + 10p)^0.75 (the DANN paper's schedule). In dann mode a step sees one
batch of source and target images together (shared BatchNorm statistics; --bn domain keeps one set per
domain). An EMA of the weights is what is validated and exported.

Model choice never looks at a test split, and in `source`/`dann` mode never at target labels: the
best checkpoint is the one with the highest accuracy on the SOURCE val split (target val accuracy is
logged for information only); in `target` mode it is the target val split.

Writes to --out:
  best.safetensors/json   the weights chosen on the validation split (what infer.py / report.py load)
  model.safetensors/json  the latest weights (after every validation)
  last.ckpt               Lightning checkpoint for --resume
  logs/                   metrics.csv (losses, val accuracies)
Unset flags take the defaults of the scenario (see SCENARIO_DEFAULTS, printed at start).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback, TQDMProgressBar  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from common.errors import UserError, cli_main  # noqa: E402
from common.fileio import check_writable, ensure_dir  # noqa: E402
from common.device import lightning_precision  # noqa: E402
from common.lightning_utils import EMA, AtomicCheckpointIO, add_trainer_flags, devices_and_strategy, last_checkpoint_callback, resolve_resume  # noqa: E402
from common.seeding import seed_everything  # noqa: E402
from p4_dann.augment import AugmentConfig, augment  # noqa: E402
from p4_dann.data import DATASETS, MODES, DomainAdaptationData, check_dataset_name  # noqa: E402
from p4_dann.model import DANN, SOURCE, TARGET, dann_lr_factor, grl_coefficient, save_dann  # noqa: E402

# Flags left unset take these values: the generic ones, overridden per (source, target).
# the EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

# Chosen on the TARGET val split's accuracy (see README.md: "how the settings were chosen").
GENERIC_DEFAULTS = dict(
    max_steps=3000, batch_size=64, lr=0.02, momentum=0.9, weight_decay=5e-4, grl_max=1.0, gamma=10.0,
    ema_decay=0.995, bn="shared", widths="32,64,128", feature_dim=256, dropout=0.3, input_norm="image",
    src_affine=1.0, src_scale_min=0.85, src_scale_max=1.2, src_invert=0.0, src_channel_shuffle=0.5, src_grey=0.2,
    src_jitter=0.3, src_colourize=0.0,
    tgt_affine=1.0, tgt_scale_min=0.85, tgt_scale_max=1.2, tgt_invert=0.0, tgt_channel_shuffle=0.0, tgt_grey=0.0,
    tgt_jitter=0.0, tgt_colourize=0.0,
)
SCENARIO_DEFAULTS: dict[tuple[str, str], dict] = {
    # USPS digits fill their 16x16 frame; MNIST(-M) digits sit in a 20x20 box of 28x28: enlarge the source
    ("mnistm", "usps"): dict(src_scale_min=1.1, src_scale_max=1.6, src_grey=0.5),
    ("mnistm", "svhn"): dict(src_invert=0.3),
    # grey MNIST painted on random colour textures (and inverted) looks more like MNIST-M
    ("mnist", "mnistm"): dict(src_colourize=0.9, src_invert=0.2, src_grey=0.0, src_jitter=0.2),
}
AUG_FIELDS = ("affine", "scale_min", "scale_max", "invert", "channel_shuffle", "grey", "jitter", "colourize")


def scenario_defaults(source: str, target: str) -> dict:
    return {**GENERIC_DEFAULTS, **SCENARIO_DEFAULTS.get((source, target), {})}


def aug_config(args, prefix: str) -> AugmentConfig:
    return AugmentConfig(**{f: float(getattr(args, f"{prefix}_{f}")) for f in AUG_FIELDS})


class DANNModule(pl.LightningModule):
    """One model, three ways to train it (`mode`); the GRL coefficient and the learning rate follow the
    training progress p = step / total_steps. Validation and export use an EMA of the weights (steadier
    from one validation to the next than the raw weights)."""

    def __init__(self, model_config: dict, mode: str, total_steps: int, lr: float = 0.02, momentum: float = 0.9,
                 weight_decay: float = 5e-4, grl_max: float = 1.0, gamma: float = 10.0, ema_decay: float = 0.995,
                 aug_source: dict | None = None, aug_target: dict | None = None, seed: int = 0,
                 val_names: tuple[str, ...] = ("source", "target")):
        super().__init__()
        self.save_hyperparameters()
        self.model = DANN(**model_config)
        self.ema = EMA(self.model, ema_decay)
        self.aug_source = AugmentConfig(**(aug_source or {}))
        self.aug_target = AugmentConfig(**(aug_target or {}))
        self.aug_gen = torch.Generator().manual_seed(seed + 7919)
        self.domain_bn = self.model.config["num_domains"] == 2
        # a model trained on the source only has no target BatchNorm statistics: it predicts with the source's
        self.eval_domain = self.bn_index(SOURCE if mode == "source" else TARGET)

    def bn_index(self, domain: int) -> int:
        """Which BatchNorm statistics a domain uses: its own with domain-specific BN, else the one shared set."""
        return domain if self.domain_bn else 0

    def progress(self) -> float:
        return min(1.0, self.global_step / max(1, self.hparams.total_steps))

    def _inputs(self, images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
        return self.model.preprocess(augment(images, cfg, self.aug_gen))

    def training_step(self, batch, batch_idx):
        mode = self.hparams.mode
        if mode == "target":
            images, labels = batch["target"]
            f = self.model.extract(self._inputs(images, self.aug_target), self.bn_index(TARGET))
            loss = F.cross_entropy(self.model.classify(f).float(), labels)
            self.log("train_cls_loss", loss, prog_bar=True)
            return loss
        images, labels = batch["source"]
        xs = self._inputs(images, self.aug_source)
        if mode == "dann":
            xt = self._inputs(batch["target"], self.aug_target)
            if self.domain_bn:  # each domain normalised with its own batch statistics
                fs, ft = self.model.extract(xs, SOURCE), self.model.extract(xt, TARGET)
            else:  # one batch of both domains through shared BatchNorm, as in the DANN paper
                fs, ft = self.model.extract(torch.cat([xs, xt]), 0).split([len(xs), len(xt)])
        else:
            fs = self.model.extract(xs, SOURCE)
        cls_loss = F.cross_entropy(self.model.classify(fs).float(), labels)
        self.log("train_cls_loss", cls_loss, prog_bar=True)
        if mode == "source":
            return cls_loss
        coeff = self.hparams.grl_max * grl_coefficient(self.progress(), self.hparams.gamma)
        logits = self.model.domain_logits(torch.cat([fs, ft]), coeff).float()
        domains = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).to(logits.device)
        dom_loss = F.binary_cross_entropy_with_logits(logits, domains)
        dom_acc = ((logits > 0).float() == domains).float().mean()
        self.log_dict({"train_dom_loss": dom_loss, "train_dom_acc": dom_acc, "grl_coeff": coeff}, prog_bar=True)
        return cls_loss + dom_loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.hparams.val_names[dataloader_idx]
        images, labels = batch
        domain = SOURCE if name == "source" else self.eval_domain
        model = self.ema.module
        logits = model(model.preprocess(images), domain)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log(f"val_{name}_acc", acc, prog_bar=True, on_epoch=True, batch_size=len(labels), sync_dist=True,
                 add_dataloader_idx=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.dim() == 1 else decay).append(p)
        opt = torch.optim.SGD([{"params": decay, "weight_decay": self.hparams.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=True)
        total = max(1, self.hparams.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: dann_lr_factor(s / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["aug_rng_state"] = self.aug_gen.get_state()

    def on_load_checkpoint(self, checkpoint) -> None:
        if "aug_rng_state" in checkpoint:
            self.aug_gen.set_state(checkpoint["aug_rng_state"])


def selection_metric(mode: str) -> str:
    """Source val accuracy unless the model is trained on target labels anyway (no target label peeking)."""
    return "val_target_acc" if mode == "target" else "val_source_acc"


class ExportBest(Callback):
    """After each validation (rank 0): export the weights as model.safetensors, and as best.safetensors when
    the selection metric improved."""

    def __init__(self, out: Path, info: dict):
        self.out, self.info = out, info
        self.best = -math.inf
        self.history: list[dict] = []

    def state_dict(self):
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state):
        self.best = state.get("best", -math.inf)
        self.history = state.get("history", [])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        metrics.update(global_step=trainer.global_step, selected_on=selection_metric(pl_module.hparams.mode))
        if self.history and self.history[-1].get("global_step") == trainer.global_step:
            return  # the same weights validated twice (the final validation on a validation step)
        self.history.append(metrics)
        model = pl_module.ema.module
        save_dann(self.out / "model.safetensors", model, pl_module.eval_domain, self.info, metrics)
        score = metrics.get(selection_metric(pl_module.hparams.mode), -math.inf)
        if score > self.best:
            self.best = score
            save_dann(self.out / "best.safetensors", model, pl_module.eval_domain, self.info, metrics)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="course digits root holding <source>/ and <target>/")
    p.add_argument("--out", required=True, help="output folder (weights, Lightning checkpoint, logs)")
    p.add_argument("--source", default="mnistm", help=f"source data set ({', '.join(DATASETS)})")
    p.add_argument("--target", default="usps", help=f"target data set ({', '.join(DATASETS)})")
    p.add_argument("--mode", choices=MODES, default="dann",
                   help="source: source labels only; dann: + unlabelled target; target: target labels only")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (sets the schedules' progress p)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="instead of --max-steps: passes over the larger training set")
    p.add_argument("--batch-size", type=int, default=None, help="images per domain per step")
    p.add_argument("--lr", type=float, default=None, help="initial SGD learning rate (annealed lr/(1+10p)^0.75)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grl-max", type=float, default=None, help="final GRL coefficient (times 2/(1+exp(-gamma p))-1)")
    p.add_argument("--gamma", type=float, default=None, help="gamma of the GRL schedule")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights that is validated and exported")
    p.add_argument("--bn", choices=("shared", "domain"), default=None,
                   help="BatchNorm statistics: shared (source and target in one batch, as in the paper) or "
                        "domain (one set per domain, target predicted with its own)")
    p.add_argument("--widths", default=None, help="channels of the three conv stages, e.g. 32,64,128")
    p.add_argument("--feature-dim", type=int, default=None, help="size of the feature vector (both heads read it)")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--input-norm", choices=("image", "fixed"), default=None,
                   help="image: standardise each image on its own; fixed: (x/255-0.5)/0.5")
    for prefix, who in (("src", "source"), ("tgt", "target")):
        p.add_argument(f"--{prefix}-affine", type=float, default=None, help=f"{who} augmentation: affine strength")
        p.add_argument(f"--{prefix}-scale-min", type=float, default=None, help=f"{who}: smallest random zoom")
        p.add_argument(f"--{prefix}-scale-max", type=float, default=None, help=f"{who}: largest random zoom")
        p.add_argument(f"--{prefix}-invert", type=float, default=None, help=f"{who}: probability of inversion")
        p.add_argument(f"--{prefix}-channel-shuffle", type=float, default=None, help=f"{who}: p of permuting RGB")
        p.add_argument(f"--{prefix}-grey", type=float, default=None, help=f"{who}: probability of turning grey")
        p.add_argument(f"--{prefix}-jitter", type=float, default=None, help=f"{who}: brightness/contrast amplitude")
        p.add_argument(f"--{prefix}-colourize", type=float, default=None,
                       help=f"{who}: probability of painting the (grey) digit on a random colour texture")
    p.add_argument("--val-every", type=int, default=250, help="validate and export every N steps")
    p.add_argument("--refresh-rate", type=int, default=1, help="progress bar refresh every N steps (0 = no bar)")
    add_trainer_flags(p, "auto: bf16 mixed on GPUs and on CPUs with native bf16 (avx512_bf16/AMX), else fp32")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill unset flags from the scenario defaults; check the values."""
    check_dataset_name(args.source, "--source")
    check_dataset_name(args.target, "--target")
    for key, value in scenario_defaults(args.source, args.target).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        widths = [int(w) for w in str(args.widths).split(",")]
    except ValueError:
        raise UserError(f"--widths must be three comma-separated integers, got {args.widths!r}") from None
    if len(widths) != 3 or min(widths) < 1:
        raise UserError(f"--widths must be three positive integers, got {args.widths!r}")
    args.widths = widths
    for name in ("batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    return args


def train(args) -> Path:
    """Train per resolved `args`; returns the output folder (holding best.safetensors)."""
    out = check_writable(args.out)
    seed_everything(args.seed)
    resume = resolve_resume(args.resume, out)
    data = DomainAdaptationData(args.data, args.source, args.target, args.mode, args.batch_size, args.seed,
                                args.num_workers)
    data.setup()  # decode every image now: a bad file fails here, before any training output exists
    steps_per_epoch = max(len(ds) // args.batch_size for ds in data.train_sets.values())
    total_steps = args.max_epochs * steps_per_epoch if args.max_epochs else args.max_steps
    ensure_dir(out)
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    model_config = dict(widths=args.widths, feature_dim=args.feature_dim, dropout=args.dropout,
                        input_norm=args.input_norm, num_domains=2 if args.bn == "domain" else 1)
    module = DANNModule(model_config, args.mode, total_steps, args.lr, args.momentum, args.weight_decay,
                        args.grl_max, args.gamma, args.ema_decay, aug_config(args, "src").as_dict(), aug_config(args, "tgt").as_dict(),
                        args.seed, tuple(data.val_names))
    hyper = {k: getattr(args, k) for k in ("batch_size", "lr", "momentum", "weight_decay", "grl_max", "gamma",
                                            "ema_decay", "bn", "seed")}
    info = {"source": args.source, "target": args.target, "mode": args.mode, "total_steps": total_steps,
            "train": {**hyper, "aug_source": aug_config(args, "src").as_dict(),
                      "aug_target": aug_config(args, "tgt").as_dict()}}
    exporter = ExportBest(out, info)
    ckpt = last_checkpoint_callback(out, args.val_every)
    callbacks = [ckpt, exporter]
    if args.refresh_rate > 0:
        callbacks.append(TQDMProgressBar(refresh_rate=args.refresh_rate))
    devices, strategy = devices_and_strategy(args.devices)
    # bf16 also on CPUs with native bf16: the defaults and the benchmark numbers were tuned that way
    precision = lightning_precision(accelerator, args.precision, cpu_native_bf16=True)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, precision=precision,
        strategy=strategy, max_steps=total_steps, max_epochs=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=CSVLogger(out, name="logs"), log_every_n_steps=25,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_progress_bar=args.refresh_rate > 0,
        enable_model_summary=False, default_root_dir=out,
    )
    print(f"P4 {args.mode}: {args.source} -> {args.target}, {total_steps} steps, batch {args.batch_size}, "
          f"{precision}, widths {args.widths}", flush=True)
    t0 = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.global_step % args.val_every != 0:
        trainer.validate(module, datamodule=data, verbose=False)  # so the final weights are candidates too
    if trainer.is_global_zero:
        best = json.loads((out / "best.json").read_text())["metrics"] if (out / "best.json").is_file() else {}
        print(f"done in {time.time() - t0:.0f} s: {out / 'best.safetensors'} "
              f"(chosen on {selection_metric(args.mode)}: {json.dumps({k: v for k, v in best.items() if k.startswith('val_')})})")
    return out


@cli_main
def main(argv=None) -> None:
    args = resolve_args(build_parser().parse_args(argv))
    train(args)


if __name__ == "__main__":
    main()
