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
The hyper-parameters' defaults are the scenario's (SCENARIO_CONFIGS): `--source S --target T --help` shows them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, TQDMProgressBar

from common.checkpoint import check_resume_fits, note_if_finished, read_resume_checkpoint
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
from common.device import lightning_precision
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir
from common.lightning_utils import (
    EMA,
    UpdateEmaEachStep,
    add_trainer_flags,
    make_trainer,
    resolve_accelerator,
    resolve_num_workers,
    resolve_resume,
)
from common.seeding import seed_everything
from p4_dann.augment import AugmentConfig, augment
from p4_dann.data import DATASETS, MODES, DomainAdaptationData, check_dataset_name
from p4_dann.model import DANN, SOURCE, TARGET, dann_lr_factor, grl_coefficient, save_dann

# the EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


@dataclass(frozen=True)
class P4TrainConfig:
    """Every hyper-parameter of a P4 training run: the flags of this script, saved in last.ckpt and in the
    exported model's JSON. These defaults are the generic ones; SCENARIO_CONFIGS holds each scenario's.

    Chosen on the TARGET val split's accuracy (see README.md: "how the settings were chosen"). The src_*/tgt_*
    fields are the source's and the target's augmentation (`aug_config`)."""

    max_steps: int = field(default=3000, metadata={
        "range": AT_LEAST_1, "help": "optimiser steps (sets the schedules' progress p)"})
    max_epochs: int | None = field(default=None, metadata={
        "range": AT_LEAST_1, "help": "instead of --max-steps: passes over the larger training set"})
    batch_size: int = field(default=64, metadata={"range": AT_LEAST_1, "help": "images per domain per step"})
    lr: float = field(default=0.02, metadata={
        "range": NON_NEGATIVE, "help": "initial SGD learning rate (annealed lr/(1+10p)^0.75)"})
    momentum: float = field(default=0.9, metadata={
        "range": SHARE, "help": "SGD (Nesterov) momentum"})
    weight_decay: float = field(default=5e-4, metadata={
        "range": NON_NEGATIVE, "help": "SGD weight decay (not on biases and norms)"})
    grl_max: float = field(default=1.0, metadata={"help": "final GRL coefficient (times 2/(1+exp(-gamma p))-1)"})
    gamma: float = field(default=10.0, metadata={"help": "gamma of the GRL schedule"})
    ema_decay: float = field(default=0.995, metadata={
        "range": BELOW_1, "help": "EMA of the weights that is validated and exported"})
    bn: str = field(default="shared", metadata={
        "choices": ("shared", "domain"),
        "help": "BatchNorm statistics: shared (source and target in one batch, as in the paper) or "
                "domain (one set per domain, target predicted with its own)"})
    widths: str = field(default="32,64,128", metadata={"help": "channels of the three conv stages"})
    feature_dim: int = field(default=256, metadata={
        "range": AT_LEAST_1, "help": "size of the feature vector (both heads read it)"})
    dropout: float = field(default=0.3, metadata={
        "range": BELOW_1, "help": "dropout of the features and the heads"})
    input_norm: str = field(default="image", metadata={
        "choices": ("image", "fixed"),
        "help": "image: standardise each image on its own; fixed: (x/255-0.5)/0.5"})
    src_affine: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE, "help": "source augmentation: affine strength"})
    src_scale_min: float = field(default=0.85, metadata={"range": POSITIVE, "help": "source: smallest random zoom"})
    src_scale_max: float = field(default=1.2, metadata={"range": POSITIVE, "help": "source: largest random zoom"})
    src_invert: float = field(default=0.0, metadata={
        "range": SHARE, "help": "source: probability of inversion"})
    src_channel_shuffle: float = field(default=0.5, metadata={
        "range": SHARE, "help": "source: p of permuting RGB"})
    src_grey: float = field(default=0.2, metadata={
        "range": SHARE, "help": "source: probability of turning grey"})
    src_jitter: float = field(default=0.3, metadata={
        "range": NON_NEGATIVE, "help": "source: brightness/contrast amplitude"})
    src_colourize: float = field(default=0.0, metadata={
        "range": SHARE,
        "help": "source: probability of painting the (grey) digit on a random colour texture"})
    tgt_affine: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE, "help": "target augmentation: affine strength"})
    tgt_scale_min: float = field(default=0.85, metadata={"range": POSITIVE, "help": "target: smallest random zoom"})
    tgt_scale_max: float = field(default=1.2, metadata={"range": POSITIVE, "help": "target: largest random zoom"})
    tgt_invert: float = field(default=0.0, metadata={"range": SHARE, "help": "target: probability of inversion"})
    tgt_channel_shuffle: float = field(default=0.0, metadata={"range": SHARE, "help": "target: p of permuting RGB"})
    tgt_grey: float = field(default=0.0, metadata={"range": SHARE, "help": "target: probability of turning grey"})
    tgt_jitter: float = field(default=0.0, metadata={
        "range": NON_NEGATIVE, "help": "target: brightness/contrast amplitude"})
    tgt_colourize: float = field(default=0.0, metadata={
        "range": SHARE, "help": "target: probability of painting the (grey) digit on a random colour texture"})
    val_every: int = field(default=250, metadata={"range": AT_LEAST_1, "help": "validate and export every N steps"})

    def width_list(self) -> list[int]:
        try:
            widths = [int(w) for w in str(self.widths).split(",")]
        except ValueError:
            raise UserError(f"--widths must be three comma-separated integers, got {self.widths!r}") from None
        if len(widths) != 3 or min(widths) < 1:
            raise UserError(f"--widths must be three positive integers, got {self.widths!r}")
        return widths

    def aug_config(self, prefix: str) -> AugmentConfig:
        """The augmentation of one domain, from the fields named `<prefix>_*` (prefix "src" or "tgt")."""
        return AugmentConfig(**{f.name: float(getattr(self, f"{prefix}_{f.name}"))
                                for f in dataclasses.fields(AugmentConfig)})


GENERIC_CONFIG = P4TrainConfig()
SCENARIO_CONFIGS: dict[tuple[str, str], P4TrainConfig] = {
    # USPS digits fill their 16x16 frame; MNIST(-M) digits sit in a 20x20 box of 28x28: enlarge the source
    ("mnistm", "usps"): dataclasses.replace(GENERIC_CONFIG, src_scale_min=1.1, src_scale_max=1.6, src_grey=0.5),
    ("mnistm", "svhn"): dataclasses.replace(GENERIC_CONFIG, src_invert=0.3),
    # grey MNIST painted on random colour textures (and inverted) looks more like MNIST-M
    ("mnist", "mnistm"): dataclasses.replace(GENERIC_CONFIG, src_colourize=0.9, src_invert=0.2, src_grey=0.0,
                                             src_jitter=0.2),
}


def scenario_config(source: str, target: str) -> P4TrainConfig:
    """The defaults of a (source, target) pair: its SCENARIO_CONFIGS entry, else the generic ones."""
    return SCENARIO_CONFIGS.get((source, target), GENERIC_CONFIG)


class DANNModule(UpdateEmaEachStep, pl.LightningModule):
    """One model, three ways to train it (`mode`); the GRL coefficient and the learning rate follow the
    training progress p = step / total_steps. Validation and export use an EMA of the weights (steadier
    from one validation to the next than the raw weights)."""

    def __init__(self, *, model_config: dict, train: dict, mode: str, total_steps: int, seed: int = 0,
                 val_names: tuple[str, ...] = ("source", "target"), scenario: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = P4TrainConfig(**train)
        self.model = DANN(**model_config)
        self.ema = EMA(self.model, self.config.ema_decay)
        self.aug_source = self.config.aug_config("src")
        self.aug_target = self.config.aug_config("tgt")
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
        coeff = self.config.grl_max * grl_coefficient(self.progress(), self.config.gamma)
        logits = self.model.domain_logits(torch.cat([fs, ft]), coeff).float()
        domains = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).to(logits.device)
        dom_loss = F.binary_cross_entropy_with_logits(logits, domains)
        dom_acc = ((logits > 0).float() == domains).float().mean()
        self.log_dict({"train_dom_loss": dom_loss, "train_dom_acc": dom_acc, "grl_coeff": coeff}, prog_bar=True)
        return cls_loss + dom_loss

    def ema_source(self):
        return self.model

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
        for p in self.model.parameters():
            (no_decay if p.dim() == 1 else decay).append(p)
        c = self.config
        opt = torch.optim.SGD([{"params": decay, "weight_decay": c.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=c.lr, momentum=c.momentum, nesterov=True)
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


PROGRAM = "p4_dann/train.py"
# what a --resume may change: how long the run goes on (the schedules' progress p then follows the new
# length, so a longer run continues at a higher rate) and how often it validates
RESUME_MAY_CHANGE = ("max_steps", "max_epochs", "val_every")


def scenario_of(args: argparse.Namespace) -> dict:
    """The data sets a run adapts between (saved with its checkpoint, checked by --resume)."""
    return {"source": args.source, "target": args.target}


def build_parser(source: str = "mnistm", target: str = "usps") -> argparse.ArgumentParser:
    """The flags; the hyper-parameters' defaults shown by --help are those of the scenario (source, target)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="course digits root holding <source>/ and <target>/")
    p.add_argument("--out", required=True, help="output folder (weights, Lightning checkpoint, logs)")
    p.add_argument("--source", default="mnistm", help=f"source data set ({', '.join(DATASETS)}; default: mnistm)")
    p.add_argument("--target", default="usps", help=f"target data set ({', '.join(DATASETS)}; default: usps). "
                                                    f"The defaults below are those of --source {source} "
                                                    f"--target {target}")
    p.add_argument("--mode", choices=MODES, default="dann",
                   help="source: source labels only; dann: + unlabelled target; target: target labels only")
    p.add_argument("--refresh-rate", type=int, default=1,
                   help="progress bar refresh every N steps (0 = no bar, as --quiet; default: 1)")
    add_config_flags(p, scenario_config(source, target),
                     f"hyper-parameters (defaults of --source {source} --target {target})")
    add_trainer_flags(p, "auto: bf16 mixed on GPUs from Ampere on and on CPUs with native bf16 (avx512_bf16/AMX), "
                         "else fp32",
                      resume_may_change=RESUME_MAY_CHANGE)
    return p


def parse_config(argv=None) -> tuple[argparse.Namespace, P4TrainConfig, set[str]]:
    """The parsed flags, the run's config (the scenario's defaults, overridden by the flags given), checked:
    a bad value is a one-line UserError before anything is written; and the names of the flags given."""
    chosen = pre_parse(argv, ("--source", "mnistm"), ("--target", "usps"))
    args = build_parser(chosen.source, chosen.target).parse_args(argv)
    resolve_num_workers(args)
    check_dataset_name(args.source, "--source")
    check_dataset_name(args.target, "--target")
    config = config_from_args(scenario_config(args.source, args.target), args)
    config.width_list()
    return args, config, explicit_flags(lambda: build_parser(args.source, args.target), argv)


def train(args: argparse.Namespace, config: P4TrainConfig, given: set[str] = frozenset()) -> Path:
    """Train per the run flags `args` and the hyper-parameters `config` (from parse_config; `given`: the flags
    on the command line, which a --resume checks against the checkpoint); returns the output folder (holding
    best.safetensors)."""
    out = check_writable(args.out)
    resume = resolve_resume(args.resume, out)
    # read and checked now: a truncated or foreign --resume checkpoint fails before anything is written
    resume_ckpt = None
    if resume is not None:
        resume_ckpt = read_resume_checkpoint(resume, PROGRAM, ("model_config", "train", "mode"))
        hp = resume_ckpt["hyper_parameters"]
        resumed_args(args, {"mode": hp["mode"], **{k: hp[k] for k in ("seed",) if k in hp},
                            **(hp.get("scenario") or {})}, given, source=resume)
        config = resumed_config(config, hp["train"], given, may_change=RESUME_MAY_CHANGE, source=resume,
                                program=PROGRAM)
        if "max_steps" in given and "max_epochs" not in given:
            # --max-epochs, when set, decides the length: a --max-steps given now means "this long instead"
            config = dataclasses.replace(config, max_epochs=None)
    seed_everything(args.seed)
    accelerator = resolve_accelerator(args.accelerator)
    data = DomainAdaptationData(args.data, args.source, args.target, args.mode, config.batch_size, args.seed,
                                args.num_workers)
    data.setup()  # decode every image now: a bad file fails here, before any training output exists
    steps_per_epoch = max(len(ds) // config.batch_size for ds in data.train_sets.values())
    total_steps = config.max_epochs * steps_per_epoch if config.max_epochs else config.max_steps
    widths = config.width_list()
    model_config = dict(widths=widths, feature_dim=config.feature_dim, dropout=config.dropout,
                        input_norm=config.input_norm, num_domains=2 if config.bn == "domain" else 1)
    module = DANNModule(model_config=model_config, train=dataclasses.asdict(config), mode=args.mode,
                        total_steps=total_steps, seed=args.seed, val_names=tuple(data.val_names),
                        scenario=scenario_of(args))
    if resume_ckpt is not None:  # a checkpoint of other settings fails here, not inside Lightning (leaving logs/)
        check_resume_fits(resume, resume_ckpt, module, PROGRAM)
        note_if_finished(resume, resume_ckpt, total_steps, "--max-epochs" if config.max_epochs else "--max-steps")
        del resume_ckpt
    ensure_dir(out)
    info = {"source": args.source, "target": args.target, "mode": args.mode, "total_steps": total_steps,
            "train": {**dataclasses.asdict(config), "seed": args.seed}}
    callbacks = [ExportBest(out, info)]
    # make_trainer shows Lightning's bar unless --quiet, and a TQDMProgressBar beside a disabled bar is an error
    quiet = args.quiet or args.refresh_rate <= 0
    if not quiet:
        callbacks.append(TQDMProgressBar(refresh_rate=args.refresh_rate))
    # bf16 also on CPUs with native bf16: the defaults and the benchmark numbers were tuned that way
    precision = lightning_precision(accelerator, args.precision, cpu_native_bf16=True)
    trainer = make_trainer(argparse.Namespace(**{**vars(args), "quiet": quiet}), out=out, precision=precision,
                           max_steps=total_steps, checkpoint_every=config.val_every, callbacks=callbacks,
                           val_every=config.val_every, max_epochs=-1, seed_steps=True)
    print(f"P4 {args.mode}: {args.source} -> {args.target}, {total_steps} steps, batch {config.batch_size}, "
          f"{precision}, widths {widths}", flush=True)
    t0 = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.global_step % config.val_every != 0:
        trainer.validate(module, datamodule=data, verbose=False)  # so the final weights are candidates too
    if trainer.is_global_zero:
        best = json.loads((out / "best.json").read_text())["metrics"] if (out / "best.json").is_file() else {}
        print(
            f"done in {time.time() - t0:.0f} s: {out / 'best.safetensors'} "
            f"(chosen on {selection_metric(args.mode)}: "
            f"{json.dumps({k: v for k, v in best.items() if k.startswith('val_')})})"
        )
    return out


@cli_main
def main(argv=None) -> None:
    args, config, given = parse_config(argv)
    train(args, config, given)


if __name__ == "__main__":
    main()
