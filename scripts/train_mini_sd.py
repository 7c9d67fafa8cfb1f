#!/usr/bin/env python
r"""Train the mini Stable Diffusion (issue 16, common/mini_sd.py) from scratch on Fill50k-style data.

    python scripts/train_mini_sd.py --stage vae --out runs/mini_sd/vae --threads 2
    python scripts/train_mini_sd.py --stage vae --out runs/mini_sd/vae --resume        # continue
    python scripts/train_mini_sd.py --stage unet --vae runs/mini_sd/vae/best_vae.safetensors \
        --data runs/mini_sd/vae/data --out runs/mini_sd/unet --threads 2
    python scripts/train_mini_sd.py --stage unet --out runs/mini_sd/unet --resume      # continue

--stage vae trains the AutoencoderKL alone; --stage unet the UNet together with the text encoder on the
frozen VAE's latents.

Data: --data (a Fill50k-layout root or split folder; images resized to --size), or by default
`p3_controlnet/make_fill50k.py --preset mini` draws --n-images samples into <out>/data once (later runs
with the same settings reuse them; the same settings draw the same images). The last --val-count items are
held out for validation; give both stages the same data, so neither has seen the validation images.

The VAE loss: L1 in RGB plus L1 in CIELAB (a perceptual colour error: the washed-out colours of a plain
L1 autoencoder cost more there), with the pixels that are not the background colour weighted more (the
circles cover a tenth of an image, the colour check weighs them as much as the background); a plain
autoencoder (posterior mean, no KL) for --ae-warmup-steps, then posterior samples and SD's tiny KL weight.
Validation (EMA weights, posterior mean) measures the CIELAB delta E (CIE76) between the reconstruction
and the image, per item averaged over its circle pixels and over its background pixels, each region
eroded by a pixel so edge blur is not counted as colour error; the target is at most 15 in both.

The UNet stage: SD v1's recipe at the mini size. The frozen VAE (--vae: a best_vae.safetensors of the VAE
stage, its latent spread folded in so latents x 0.18215 have unit std) encodes every image once, to its
posterior mean (cached in <out>/latents.safetensors): the trained VAE's posterior std is about 0.02 against
a latent spread of 1, so a sample would differ from the mean by noise the UNet could not tell from the
data, and the decoder was validated on means. The UNet (eps prediction, SD's scaled-linear 1000-step
schedule) and the CLIP text encoder (SD's tokenizer, 77 tokens) train together with AdamW from scratch;
--caption-dropout of the captions are replaced by the empty prompt, which is what classifier-free
guidance subtracts. Batches, timesteps, noise and dropout are drawn from --seed and the step number alone,
so a resumed run continues exactly as an uninterrupted one. Validation (EMA weights): the diffusion loss
on the held-out latents (fixed noise), and --val-prompts held-out prompts that name every colour sampled
(DDIM --val-steps, guidance --val-guidance, one fixed seed per prompt), decoded and scored by the Fill50k
judge (p3_controlnet/fill50k_judge.py): colour_share is the share whose circle and background colours
are all right, and picks the best model.

Writes to --out:
  last.ckpt                Lightning checkpoint (weights, EMA, optimiser) for --resume
  logs/                    Lightning's CSV logs (training losses)
  val_curve.csv            step, training minutes and CPU minutes so far, and every validation metric
  samples/step_XXXXXX.png  validation samples (VAE: images over reconstructions; UNet: generated images)
 VAE stage:
  vae.safetensors/json     EMA VAE after every validation, its latent spread folded into the weights so
                           that latents * 0.18215 have unit std (SD's convention); the JSON has the metrics
  best_vae.safetensors     the one with the lowest max(circle, background) delta E
 UNet stage:
  latents.safetensors      the cached latents of every data item
  model/                   the EMA UNet and text encoder with the VAE after every validation, a diffusers
                           folder in fp16 that common.stable_diffusion.load_sd loads, with mini_sd.json
                           (how every stage was trained, its metrics, the native resolution)
  best_model/              the same, of the validation with the highest colour_share
  val_prompts.json         the validation prompts (item index, prompt, seed)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from common.checkpoint import note_if_finished, read_resume_checkpoint, save_checkpoint
from common.colour import delta_e, srgb_to_lab
from common.config import (
    AT_LEAST_1,
    BELOW_1,
    NON_NEGATIVE,
    POSITIVE,
    HelpFormatter,
    add_config_flags,
    config_from_args,
    explicit_flags,
    int_at_least,
    pre_parse,
    resumed_args,
    resumed_config,
)
from common.device import lightning_precision, setup_cuda_fast_math
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir, write_text_atomic
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
from common.seeding import seed_everything, validation_generator

STAGES = ("vae", "unet")
VAE_KIND = "mini_sd_vae"
PROGRAM = "scripts/train_mini_sd.py"
# what a --resume may change: how long the run goes on and how it validates
RESUME_MAY_CHANGE = ("max_steps", "cooldown_from", "val_every", "val_prompts", "val_steps", "val_guidance")


@dataclass(frozen=True)
class MiniSDTrainConfig:
    """Every hyper-parameter of a mini SD training stage: the flags of this script, saved in last.ckpt and
    in the exported JSON. STAGE_CONFIGS holds each stage's values."""

    # data
    n_images: int = field(default=20000, metadata={
        "range": AT_LEAST_1,
        "help": "samples make_fill50k.py --preset mini draws into <out>/data when --data is not given "
                "(validation items included)"})
    val_count: int = field(default=512, metadata={
        "range": AT_LEAST_1, "help": "the last N data items are held out for validation"})
    size: int = field(default=64, metadata={
        "aliases": ("--resolution",), "help": "image side in pixels (the mini SD's native 64)"})
    data_seed: int = field(default=0, metadata={"help": "--seed of the generated data"})
    # optimisation
    max_steps: int = field(default=30000, metadata={"range": AT_LEAST_1, "help": "optimiser steps to train for"})
    batch_size: int = field(default=16, metadata={"range": AT_LEAST_1, "help": "images per step (per device)"})
    lr: float = field(default=5e-4, metadata={
        "range": NON_NEGATIVE, "help": "AdamW learning rate (after --warmup-steps)"})
    weight_decay: float = field(default=0.0, metadata={
        "range": NON_NEGATIVE, "help": "AdamW weight decay"})
    warmup_steps: int = field(default=200, metadata={
        "range": NON_NEGATIVE, "help": "linear warm-up of the rate over these steps"})
    cooldown_from: int | None = field(default=None, metadata={
        "metavar": "STEP", "help": "from this step the rate falls linearly to 0 at --max-steps (none: constant); "
                                   "can be added when resuming"})
    ema_decay: float = field(default=0.999, metadata={
        "range": BELOW_1, "help": "EMA of the weights that is validated and exported"})
    grad_clip: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE, "help": "clip the gradient norm to this (0: off)"})
    val_every: int = field(default=500, metadata={
        "range": AT_LEAST_1, "help": "validate, export and checkpoint every N steps"})
    # the VAE
    vae_channels: str = field(default="32,64,64,64", metadata={
        "help": "AutoencoderKL widths per level (multiples of 32; four levels: 8x smaller latents)"})
    vae_layers: int = field(default=1, metadata={"range": AT_LEAST_1, "help": "AutoencoderKL resnet layers per level"})
    lab_weight: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE,
        "help": "weight of the L1 error in CIELAB (in units of 100) beside the L1 error in RGB ([-1, 1])"})
    circle_weight: float = field(default=3.0, metadata={
        "range": POSITIVE,
        "help": "weight of the pixels not of the background colour (corner pixel) relative to the others"})
    kl_weight: float = field(default=1e-6, metadata={
        "range": NON_NEGATIVE,
        "help": "KL weight relative to the reconstruction error summed per image, as in SD's VAE"})
    ae_warmup_steps: int = field(default=1000, metadata={
        "range": NON_NEGATIVE, "help": "plain autoencoder (posterior mean, no KL) for the first N steps"})
    target_delta_e: float = field(default=15.0, metadata={
        "range": POSITIVE, "help": "delta E an item must stay within in both regions to count in pass_share"})
    # the UNet and text encoder
    unet_channels: str = field(default="64,128,128", metadata={
        "help": "UNet2DConditionModel widths per level (multiples of 32; cross-attention on all but the last)"})
    unet_layers: int = field(default=1, metadata={"range": AT_LEAST_1, "help": "UNet resnet layers per level"})
    text_width: int = field(default=128, metadata={
        "help": "CLIP text encoder width (a multiple of 64: 64-wide heads, as SD's CLIP and the single-file "
                "loader have them); also the UNet's cross-attention width"})
    text_layers: int = field(default=3, metadata={"range": AT_LEAST_1, "help": "CLIP text encoder layers"})
    caption_dropout: float = field(default=0.1, metadata={
        "range": BELOW_1,
        "help": "share of training captions replaced by the empty prompt (for classifier-free guidance)"})
    val_prompts: int = field(default=128, metadata={
        "range": AT_LEAST_1,
        "help": "held-out prompts naming every colour that are sampled and judged at each validation"})
    val_steps: int = field(default=20, metadata={"range": AT_LEAST_1, "help": "DDIM steps of the validation samples"})
    val_guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance of the validation samples"})

    def vae_config(self) -> dict:
        from common.mini_sd import MINI_VAE
        channels = _channels(self.vae_channels, "--vae-channels")
        n = len(channels)
        return dict(MINI_VAE, block_out_channels=channels, layers_per_block=self.vae_layers,
                    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                    sample_size=self.size)


    def unet_config(self, latent_size: int) -> dict:
        from common.mini_sd import MINI_UNET
        channels = _channels(self.unet_channels, "--unet-channels")
        n = len(channels)
        # SD v1's layout: cross-attention at every level but the deepest
        return dict(MINI_UNET, block_out_channels=channels, layers_per_block=self.unet_layers,
                    down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                    cross_attention_dim=self.text_width, sample_size=latent_size)

    def text_config(self) -> dict:
        from common.mini_sd import MINI_TEXT
        if self.text_width < 64 or self.text_width % 64:
            raise UserError(f"--text-width must be a multiple of 64 (64-wide heads), got {self.text_width}")
        return dict(MINI_TEXT, hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                    num_hidden_layers=self.text_layers, num_attention_heads=self.text_width // 64,
                    projection_dim=self.text_width)


def _channels(text: str, flag: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if len(channels) < 2 or any(c < 32 or c % 32 for c in channels):
        raise UserError(f"{flag}: at least two levels, each a multiple of 32, got {text!r}")
    return channels


STAGE_CONFIGS = {
    "vae": MiniSDTrainConfig(),
    # the probe of issue 16: 0.73 s a step at batch 64 on 2 CPU threads
    "unet": MiniSDTrainConfig(max_steps=20000, batch_size=64, lr=3e-4, warmup_steps=500, val_every=1000),
}


# ------------------------------------------------------------------------------------------------ data

def generated_data(root: Path, n: int, size: int, seed: int) -> Path:
    """<root>/training/ drawn by make_fill50k.py --preset mini: reused when <root>/settings.json records the
    same settings, otherwise (re)generated; settings.json is written last, so an interrupted run regenerates."""
    from p3_controlnet.make_fill50k import PRESET_OPTIONS, write_split
    options = PRESET_OPTIONS["mini"]
    settings = {"generator": "p3_controlnet/make_fill50k.py", "preset": "mini", "n": n, "size": size, "seed": seed,
                "options": dataclasses.asdict(options)}
    record = root / "settings.json"
    try:
        done = json.loads(record.read_text()) == settings and (root / "training" / "prompt.json").is_file()
    except (OSError, ValueError):
        done = False
    if not done:
        print(f"generating {n} mini-preset Fill50k samples ({size}x{size}, seed {seed}) into {root}", file=sys.stderr)
        record.unlink(missing_ok=True)
        write_split(ensure_dir(root) / "training", n, size, seed, options=options, progress=True)
        write_text_atomic(record, json.dumps(settings) + "\n")
    return root / "training"


def load_targets(split: Path, size: int) -> tuple[torch.Tensor, list[dict]]:
    """All target images of a split as one (N,3,size,size) uint8 tensor (they fit in memory at 64 px:
    20000 images are 250 MB), and the prompt.json items."""
    from common.datasets import load_image
    from p3_controlnet.data import read_prompt_file
    items = read_prompt_file(split / "prompt.json")
    images = np.stack([load_image(split / "target" / it["target"], size, resize=True) for it in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), items


# --------------------------------------------------------------------------------------- loss and metric

def foreground_mask(images: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """(B,1,H,W) 1.0 where an image in [-1, 1] differs from its top-left pixel (the background: a circle
    never reaches a corner) by more than `tol` in some channel."""
    corner = images[:, :, :1, :1]
    return ((images - corner).abs().amax(1, keepdim=True) > tol).float()


def vae_reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, lab_weight: float,
                            circle_weight: float) -> tuple[torch.Tensor, dict]:
    """Pixel-weighted mean of the RGB L1 error ([-1, 1] units) plus lab_weight x the CIELAB L1 error / 100
    (both per channel); pixels not of the background colour weigh `circle_weight`, the others 1."""
    w = 1 + (circle_weight - 1) * foreground_mask(target)
    l1 = (w * (recon - target).abs().mean(1, keepdim=True)).sum() / w.sum()
    lab_error = (srgb_to_lab((recon + 1) / 2) - srgb_to_lab((target + 1) / 2)).abs().mean(1, keepdim=True)
    lab = (w * lab_error).sum() / w.sum()
    return l1 + lab_weight * lab / 100, {"l1": l1.detach(), "lab": lab.detach()}


def region_delta_e(recon: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the mean CIELAB delta E over its circle pixels and over its background pixels (each region
    eroded by one pixel); NaN where a region has no pixel left."""
    de = delta_e((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2)  # (B,H,W)
    fg = foreground_mask(target)
    out = []
    for region in (fg, 1 - fg):
        inner = -F.max_pool2d(-region, 3, stride=1, padding=1)  # erosion; the image border counts as inside
        inner = inner[:, 0]
        count = inner.sum((1, 2))
        out.append(torch.where(count > 0, (de * inner).sum((1, 2)) / count.clamp_min(1), torch.nan))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------ model

class MiniVAEModule(UpdateEmaEachStep, pl.LightningModule):
    """The AutoencoderKL with its EMA copy; validation scores the EMA weights on held-out images."""

    def __init__(self, *, vae_config: dict, train: dict, seed: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = MiniSDTrainConfig(**train)
        from diffusers import AutoencoderKL
        self.vae = AutoencoderKL(**vae_config)
        self.ema = EMA(self.vae, self.config.ema_decay)
        self._val: list[dict] = []
        self.val_summary: dict = {}

    def training_step(self, batch, batch_idx):
        c = self.config
        x = batch[0].float() / 127.5 - 1
        posterior = self.vae.encode(x).latent_dist
        plain = self.global_step < c.ae_warmup_steps
        z = posterior.mode() if plain else posterior.sample()
        recon = self.vae.decode(z).sample
        rec, parts = vae_reconstruction_loss(recon, x, c.lab_weight, c.circle_weight)
        # KL per image over the number of pixel values: the ratio to the per-pixel mean error is then SD's
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec if plain else rec + c.kl_weight * kl
        self.log_dict({"train_loss": loss, "train_l1": parts["l1"], "train_lab": parts["lab"],
                       "train_kl": kl.detach()}, on_step=True, on_epoch=False)
        return loss

    def ema_source(self):
        return self.vae

    def validation_step(self, batch, batch_idx):
        x = batch[0].float() / 127.5 - 1
        vae = self.ema.module
        mean = vae.encode(x).latent_dist.mode()
        recon = vae.decode(mean).sample
        de_circle, de_background = region_delta_e(recon, x)
        self._val.append({"circle": de_circle.cpu(), "background": de_background.cpu(),
                          "l1": ((recon.clamp(-1, 1) - x).abs().mean((1, 2, 3)) * 127.5).cpu(),
                          "latents": mean.flatten(1).cpu()})
        if batch_idx == 0:
            self.val_pictures = (x[:8].cpu(), recon[:8].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        cat = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val = []
        circle, background = cat["circle"], cat["background"]
        target = self.config.target_delta_e
        ok = ~(circle > target) & ~(background > target)  # an item without circle pixels passes on its background
        summary = {
            "de_circle": float(circle.nanmean()), "de_background": float(background.nanmean()),
            "de_circle_p90": float(circle.nanquantile(0.9)), "de_background_p90": float(background.nanquantile(0.9)),
            "pass_share": float(ok.float().mean()), "l1_255": float(cat["l1"].mean()),
            "latent_std": float(cat["latents"].std()), "val_items": len(circle),
        }
        self.val_summary = summary
        for k, v in summary.items():
            if k != "val_items":
                self.log(f"val_{k}", v, sync_dist=True)

    def configure_optimizers(self):
        c = self.config
        return adamw_with_schedule(self.vae.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                   warmup_steps=c.warmup_steps, cooldown_from=c.cooldown_from,
                                   max_steps=c.max_steps)


def folded_vae_state(vae, latent_std: float) -> tuple[dict, float]:
    """A copy of the VAE's weights with its latent spread folded in (common.mini_sd.fold_latent_scale), so
    that latents * scaling_factor have unit std; and the factor used."""
    import copy

    from common.mini_sd import fold_latent_scale
    folded = copy.deepcopy(vae)
    factor = 1.0 / (latent_std * folded.config.scaling_factor)
    fold_latent_scale(folded, factor)
    return folded.state_dict(), factor


class StageClock(Callback):
    """What the validation callbacks of both stages share: training and CPU time summed across resumed runs
    (saved in last.ckpt), the best value of the stage's metric so far, val_curve.csv and the speed."""

    FIELDS: tuple[str, ...] = ()
    START_BEST = math.inf

    def __init__(self, out: Path):
        self.out = out
        self.best = self.START_BEST
        self.train_seconds = 0.0
        self.cpu_seconds = 0.0
        self._clock = None

    def state_dict(self):
        self._tick()
        return {"best": self.best, "train_seconds": self.train_seconds, "cpu_seconds": self.cpu_seconds}

    def load_state_dict(self, state):
        self.best = state.get("best", self.START_BEST)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.cpu_seconds = state.get("cpu_seconds", 0.0)

    def _tick(self) -> None:
        now = (time.monotonic(), time.process_time())
        if self._clock is not None:
            self.train_seconds += now[0] - self._clock[0]
            self.cpu_seconds += now[1] - self._clock[1]
        self._clock = now

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = (time.monotonic(), time.process_time())
        self._last = (trainer.global_step, time.monotonic())

    def _curve_row(self, step: int, summary: dict) -> dict:
        """The time so far and the summary's FIELDS, appended to val_curve.csv and returned."""
        self._tick()
        row = {"step": step, "train_minutes": round(self.train_seconds / 60, 3),
               "cpu_minutes": round(self.cpu_seconds / 60, 3),
               **{k: round(summary[k], 4) for k in self.FIELDS[3:]}}
        curve = self.out / "val_curve.csv"
        new = not curve.is_file()
        with open(curve, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row

    def after_validation(self, trainer, pl_module, summary: dict) -> None:
        """The stage's work after a validation (rank 0): export, keep the best, write the curve."""
        raise NotImplementedError

    def on_validation_end(self, trainer, pl_module) -> None:
        summary = getattr(pl_module, "val_summary", {})
        if trainer.sanity_checking or not summary:
            return
        if trainer.is_global_zero:
            self.after_validation(trainer, pl_module, summary)
        # last.ckpt once more (every rank takes part): the checkpoint callback wrote it before this validation,
        # so a run resumed from it would lose the validation's time and its best
        trainer.save_checkpoint(self.out / "last.ckpt", weights_only=False)

    def _speed(self, step: int) -> float:
        """Wall seconds a step since the last call (validation included)."""
        last_step, last_time = self._last
        speed = (time.monotonic() - last_time) / max(1, step - last_step)
        self._last = (step, time.monotonic())
        return speed


class ValidateAndExport(StageClock):
    """After each validation (rank 0): export the EMA VAE, keep the best, append to val_curve.csv, save a
    reconstruction grid and print one line. Training and CPU time are summed across resumed runs."""

    FIELDS = ("step", "train_minutes", "cpu_minutes", "de_circle", "de_background", "de_circle_p90",
              "de_background_p90", "pass_share", "l1_255", "latent_std")

    def after_validation(self, trainer, pl_module, summary: dict) -> None:
        step = trainer.global_step
        row = self._curve_row(step, summary)
        state, factor = folded_vae_state(pl_module.ema.module, summary["latent_std"])
        config = {"vae": pl_module.hparams.vae_config, "train": pl_module.hparams.train,
                  "latent_std_unfolded": summary["latent_std"], "latent_scale_folded": factor}
        metrics = {**row, "val_items": summary["val_items"]}
        save_checkpoint(self.out / "vae.safetensors", state, VAE_KIND, config, metrics)
        worst = max(summary["de_circle"], summary["de_background"])
        if worst < self.best:
            self.best = worst
            save_checkpoint(self.out / "best_vae.safetensors", state, VAE_KIND, config, metrics)
        x, recon = pl_module.val_pictures
        save_grid(self.out / "samples" / f"step_{step:06d}.png", to_uint8(torch.cat([x, recon])), 2, len(x), scale=2)
        speed = self._speed(step)
        print(f"step {step}: delta E circle {summary['de_circle']:.2f} (p90 {summary['de_circle_p90']:.2f}), "
              f"background {summary['de_background']:.2f} (p90 {summary['de_background_p90']:.2f}), "
              f"pass {summary['pass_share']:.3f}, L1 {summary['l1_255']:.2f}/255, latent std "
              f"{summary['latent_std']:.3f}; {speed:.2f} s/step, {row['train_minutes']:.1f} min so far", flush=True)


# ------------------------------------------------------------------------------------------- UNet stage

UNET_VAE_PREFIX = "vae."


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and bytes: which VAE encoded a latent cache."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_vae(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(state dict, AutoencoderKL config, the VAE stage's JSON: config and metrics) of a VAE-stage checkpoint."""
    from common.checkpoint import read_checkpoint, sidecar_json
    state, config = read_checkpoint(path, VAE_KIND)
    if "vae" not in config:
        raise UserError(f"{path}: its header has no VAE config (not written by --stage vae?)")
    try:
        info = json.loads(sidecar_json(path).read_text())
    except (OSError, ValueError):
        info = {"config": config}
    return state, config["vae"], info


@torch.no_grad()
def encode_split(vae, split: Path, size: int, batch: int = 256) -> torch.Tensor:
    """Every target of a split as scaled posterior-mean latents (N, 4, h, w), float32, on the CPU."""
    from common.stable_diffusion import encode_images
    images, _ = load_targets(split, size)
    vae = vae.eval()
    device = next(vae.parameters()).device
    out = [encode_images(vae, images[i:i + batch].to(device).float() / 127.5 - 1, sample=False).float().cpu()
           for i in range(0, len(images), batch)]
    # the convolution hands back a channels-last layout; the UNet's kernels round differently on it than on
    # the layout the cache file gives back, so a resumed run would drift from an uninterrupted one
    return torch.cat(out).contiguous(memory_format=torch.contiguous_format)


def cached_latents(out: Path, vae, vae_key: str, split: Path, size: int) -> torch.Tensor:
    """encode_split's latents, from <out>/latents.safetensors when it was written for the same VAE weights,
    prompt file and size, otherwise encoded now and written there."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from common.fileio import atomic_path
    path = out / "latents.safetensors"
    key = {"vae": vae_key, "prompt_json_sha256": hashlib.sha256((split / "prompt.json").read_bytes()).hexdigest(),
           "size": str(size), "split": str(split.resolve()), "latents": "posterior mean x scaling_factor"}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) == key:
                    return f.get_tensor("latents")
        except Exception:  # a truncated or foreign file: encode again
            pass
    print(f"encoding the targets of {split} with the frozen VAE (once; cached in {path})", file=sys.stderr)
    latents = encode_split(vae, split, size)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata=key)
    return latents


def validation_prompts(items: list[dict], first: int, count: int, seed: int) -> list[dict]:
    """Up to `count` of the held-out items (index >= first) whose prompt names every colour, in order, each
    with a fixed sampling seed."""
    from p3_controlnet.fill50k_judge import parse_prompt
    chosen = []
    for i in range(first, len(items)):
        try:
            expect = parse_prompt(items[i]["prompt"])
        except ValueError:
            continue
        if all(c is not None for c in expect.circles):
            chosen.append({"index": i, "prompt": items[i]["prompt"], "seed": seed * 100_003 + i})
        if len(chosen) == count:
            break
    return chosen


class MiniUNetModule(UpdateEmaEachStep, pl.LightningModule):
    """The UNet and the text encoder (trained together, `net`), their EMA copy, and the frozen VAE (kept in
    the checkpoint, so --resume needs no --vae). The data (cached latents and token ids) are attached with
    `attach_data`; batches come from the step number, not from Lightning's loader (see training_step)."""

    def __init__(self, *, unet_config: dict, text_config: dict, vae_config: dict, train: dict, seed: int,
                 vae_source: dict, command: str = ""):
        super().__init__()
        self.save_hyperparameters()
        self.config = MiniSDTrainConfig(**train)
        from common.mini_sd import build_text_encoder, build_unet, build_vae
        from common.stable_diffusion import build_clip_tokenizer, make_ddpm_scheduler
        self.net = torch.nn.ModuleDict({"unet": build_unet(unet_config),
                                        "text_encoder": build_text_encoder(text_config)})
        self.ema = EMA(self.net, self.config.ema_decay)
        self.vae = build_vae(vae_config).eval().requires_grad_(False)
        self.noise_scheduler = make_ddpm_scheduler()
        self.tokenizer = build_clip_tokenizer(text_config["max_position_embeddings"])
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.seed = seed
        self.val_items: list[dict] = []
        self.val_summary: dict = {}
        self._val_losses: list[torch.Tensor] = []
        self._perm: tuple[int, torch.Tensor] | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen, and the EMA copy only evaluates: never in training mode
        self.ema.module.eval()
        return self

    # ---- data
    def attach_data(self, latents: torch.Tensor, ids: torch.Tensor, val_count: int, val_items: list[dict]) -> None:
        """latents (N, 4, h, w) and token ids (N, 77) of every item; the last val_count are held out."""
        self.train_latents, self.train_ids = latents[:-val_count], ids[:-val_count]
        self.val_latents, self.val_ids = latents[-val_count:], ids[-val_count:]
        self.empty_ids = self._tokens([""])[0]
        self.val_items = val_items

    def _tokens(self, prompts) -> torch.Tensor:
        from common.stable_diffusion import tokenize
        return tokenize(self.tokenizer, prompts)

    def batch_indices(self, position: int) -> torch.Tensor:
        """The items of batch `position` (global step x world size + rank): epoch after epoch of permutations
        drawn from (seed, epoch), so the batches of a step never depend on where a run was resumed."""
        from common.seeding import sample_seed
        b = self.config.batch_size
        per_epoch = len(self.train_latents) // b
        epoch, k = divmod(position, per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.train_latents), generator=g))
        return self._perm[1][k * b:(k + 1) * b]

    # ---- diffusion
    def diffusion_loss(self, net, latents: torch.Tensor, ids: torch.Tensor, g: torch.Generator,
                       dropout: float) -> torch.Tensor:
        """SD's eps-prediction loss; t, noise and the caption dropout drawn on the CPU from `g`."""
        b = len(latents)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        drop = torch.rand(b, generator=g) < dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        t, noise, ids, latents = (x.to(self.device) for x in (t, noise, ids, latents))
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        context = net["text_encoder"](ids)[0]
        eps = net["unet"](noisy, t, encoder_hidden_states=context).sample
        return F.mse_loss(eps.float(), noise)

    def training_step(self, batch, batch_idx):
        # Lightning's loader only paces the loop (its items are ignored): the batch, t, noise and caption
        # dropout are functions of (seed, global step, rank), so a resumed run repeats an uninterrupted one
        from common.seeding import sample_seed
        position = self.global_step * self.trainer.world_size + self.global_rank
        idx = self.batch_indices(position)
        g = torch.Generator().manual_seed(sample_seed(self.seed + 1, position))
        loss = self.diffusion_loss(self.net, self.train_latents[idx], self.train_ids[idx], g,
                                   self.config.caption_dropout)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def ema_source(self):
        return self.net

    def validation_step(self, batch, batch_idx):
        index = batch[0].cpu()
        g = validation_generator(batch_idx)
        self._val_losses.append(self.diffusion_loss(self.ema.module, self.val_latents[index], self.val_ids[index], g,
                                                    0.0).detach().cpu())

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float,
               batch: int = 128) -> np.ndarray:
        """(N, H, W, 3) uint8 images of the EMA model: DDIM from one fixed seed per image, guided."""
        from common.stable_diffusion import (
            decode_latents,
            encode_prompts,
            initial_latents,
            make_ddim_scheduler,
            sample_latents,
        )
        unet, text_encoder = self.ema.module["unet"], self.ema.module["text_encoder"]
        scheduler = make_ddim_scheduler(self.noise_scheduler)
        size = unet.config.sample_size
        out = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            cond = encode_prompts(self.tokenizer, text_encoder, chunk, self.device)
            uncond = encode_prompts(self.tokenizer, text_encoder, [""] * len(chunk), self.device)
            z = initial_latents(seeds[i:i + batch], (unet.config.in_channels, size, size), self.device)
            z = sample_latents(unet, scheduler, z, cond, uncond, steps=steps, guidance=guidance)
            out.append(to_uint8(decode_latents(self.vae, z)))
        return np.concatenate(out)

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses or self.trainer.sanity_checking:
            self._val_losses = []
            return
        from p3_controlnet.fill50k_judge import score_image, summarise
        val_loss = float(torch.stack(self._val_losses).mean())
        self._val_losses = []
        c = self.config
        items = self.val_items
        images = self.sample([it["prompt"] for it in items], [it["seed"] for it in items], c.val_steps,
                             c.val_guidance)
        judged = summarise([score_image(img, it["prompt"]) for img, it in zip(images, items)])
        summary = {"val_loss": val_loss, "colour_share": judged["colour_following_share"] or 0.0,
                   "circle_share": judged["circle_right_share"] or 0.0,
                   "background_share": judged["background_right_share"] or 0.0,
                   "two_circle_share": judged["both_named_circles_share"] or 0.0, "val_prompts": len(items)}
        self.val_summary = summary
        self.val_images = images
        for k, v in summary.items():
            if k != "val_prompts":
                self.log(f"val_{k}", v, sync_dist=True)

    def configure_optimizers(self):
        c = self.config
        return adamw_with_schedule(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                   warmup_steps=c.warmup_steps, cooldown_from=c.cooldown_from,
                                   max_steps=c.max_steps)

    def components(self):
        """The EMA UNet and text encoder with the VAE, as the SDComponents that load_sd would return."""
        from common.stable_diffusion import SDComponents
        return SDComponents(self.vae, self.ema.module["unet"], self.ema.module["text_encoder"], self.tokenizer,
                            self.noise_scheduler, "mini_sd")


@contextlib.contextmanager
def quiet_hf():
    """diffusers' and transformers' save_pretrained without their warnings and progress bars (the fp16 cast
    warns about modules to keep in fp32, of which SD v1 has none), so the training log stays one line a
    validation."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        tlog.enable_progress_bar()


class ValidateAndExportUNet(StageClock):
    """After each validation (rank 0): append to val_curve.csv, export the EMA model as a diffusers folder
    (model/, and best_model/ when its colour_share is the best so far), save the samples, print one line."""

    FIELDS = ("step", "train_minutes", "cpu_minutes", "val_loss", "colour_share", "circle_share",
              "background_share", "two_circle_share")
    START_BEST = -math.inf

    def __init__(self, out: Path, info: dict):
        super().__init__(out)
        self.info = info

    def after_validation(self, trainer, pl_module, summary: dict) -> None:
        from common.mini_sd import export_diffusers
        step = trainer.global_step
        row = self._curve_row(step, summary)
        speed = self._speed(step)
        info = json.loads(json.dumps(self.info))  # a copy
        info["stages"]["unet"].update(metrics={**row, "val_prompts": summary["val_prompts"]},
                                      train_minutes=row["train_minutes"], cpu_minutes=row["cpu_minutes"])
        comps = pl_module.components()
        with quiet_hf():
            export_diffusers(comps, self.out / "model", info)
            if summary["colour_share"] > self.best:
                self.best = summary["colour_share"]
                export_diffusers(comps, self.out / "best_model", info)
        images = pl_module.val_images[:16]
        rows = 2 if len(images) % 2 == 0 else 1
        save_grid(self.out / "samples" / f"step_{step:06d}.png", images, rows, len(images) // rows, scale=2)
        print(f"step {step}: val loss {summary['val_loss']:.4f}, colour-following {summary['colour_share']:.3f} "
              f"(circle {summary['circle_share']:.3f}, background {summary['background_share']:.3f}, both of two "
              f"{summary['two_circle_share']:.3f}) of {summary['val_prompts']} prompts; {speed:.2f} s/step, "
              f"{row['train_minutes']:.1f} min so far", flush=True)


def train_unet(args, config: MiniSDTrainConfig, out: Path) -> None:
    resume = resolve_resume(args.resume, out)
    if resume is None and args.vae is None:
        raise UserError("--stage unet needs --vae: the best_vae.safetensors of a --stage vae run")
    ckpt = None
    if resume is not None:  # the networks, the VAE and the settings are the checkpoint's
        ckpt, config = resume_stage(resume, "unet", args, config)
        hparams = ckpt["hyper_parameters"]
    seed_everything(args.seed)
    split = stage_data(args, config, out)
    ensure_dir(out)
    from p3_controlnet.data import read_prompt_file
    items = read_prompt_file(split / "prompt.json")
    if len(items) < config.val_count + config.batch_size:
        raise UserError(f"{split}: {len(items)} items, need at least --val-count {config.val_count} + "
                        f"--batch-size {config.batch_size}")

    if ckpt is not None:
        vae_state = {k[len(UNET_VAE_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                     if k.startswith(UNET_VAE_PREFIX)}
        unet_config, text_config = hparams["unet_config"], hparams["text_config"]
        vae_config, vae_source = hparams["vae_config"], hparams["vae_source"]
        command = hparams.get("command", "")
        if args.vae is not None and state_fingerprint(read_vae(args.vae)[0]) != vae_source["fingerprint"]:
            raise UserError(f"--vae {args.vae} is not the VAE this run was started with ({vae_source['path']}); "
                            f"leave --vae out when resuming")
    else:
        vae_state, vae_config, vae_info = read_vae(args.vae)
        vae_source = {"path": str(Path(args.vae).resolve()), "fingerprint": state_fingerprint(vae_state),
                      "stage_info": vae_info}
        command = "python scripts/train_mini_sd.py " + " ".join(args.argv)
        text_config = config.text_config()
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        unet_config = config.unet_config(config.size // factor)

    from common.mini_sd import build_vae
    vae = build_vae(vae_config)
    from common.checkpoint import load_into
    load_into(vae, vae_state, args.vae or resume)
    latents = cached_latents(out, vae, vae_source["fingerprint"], split, config.size)
    if len(latents) != len(items):
        raise UserError(f"{out / 'latents.safetensors'}: {len(latents)} latents for {len(items)} items")
    if latents.shape[-1] != unet_config["sample_size"]:
        raise UserError(f"the VAE makes {latents.shape[-1]}-pixel latents at --size {config.size}; the UNet was "
                        f"built for {unet_config['sample_size']}")

    torch.manual_seed(args.seed)  # the initial weights
    module = MiniUNetModule(unet_config=unet_config, text_config=text_config, vae_config=vae_config,
                            train=dataclasses.asdict(config), seed=args.seed, vae_source=vae_source,
                            command=command)
    module.vae.load_state_dict(vae.state_dict())
    # token ids of the distinct prompts, tokenized once
    prompts = [it["prompt"] for it in items]
    distinct = sorted(set(prompts))
    table = module._tokens(distinct)
    where = {p: k for k, p in enumerate(distinct)}
    ids = table[torch.tensor([where[p] for p in prompts])]
    first_val = len(items) - config.val_count
    val_items = validation_prompts(items, first_val, config.val_prompts, args.seed)
    if not val_items:
        raise UserError(f"{split}: none of the last --val-count {config.val_count} prompts names every colour")
    module.attach_data(latents, ids, config.val_count, val_items)
    write_text_atomic(out / "val_prompts.json", json.dumps(val_items, indent=1) + "\n")

    settings_file = split.parent / "settings.json"
    info = {
        "native_resolution": config.size,
        "latent_size": unet_config["sample_size"],
        "description": "mini Stable Diffusion (issue 16): SD v1's classes trained from scratch on Fill50k-style "
                       "data (make_fill50k.py --preset mini) by scripts/train_mini_sd.py",
        "data": json.loads(settings_file.read_text()) if settings_file.is_file() else {"split": str(split)},
        "validation": {"prompts": len(val_items), "sampler": f"DDIM {config.val_steps} steps",
                       "guidance": config.val_guidance, "judge": "p3_controlnet/fill50k_judge.py",
                       "items": f"the last {config.val_count} data items (held out from both stages)"},
        "stages": {"vae": vae_source.get("stage_info", {}),
                   "unet": {"config": dataclasses.asdict(config), "unet": unet_config, "text_encoder": text_config,
                            "seed": args.seed, "command": command,
                            "last_command": "python scripts/train_mini_sd.py " + " ".join(args.argv),
                            "latents": "posterior mean x scaling_factor, cached"}},
    }

    val_loader = DataLoader(TensorDataset(torch.arange(config.val_count)), batch_size=128, num_workers=0)
    per_epoch = len(module.train_latents) // config.batch_size
    # paces Lightning's loop only: training_step draws its own batch from the step number
    pace = DataLoader(TensorDataset(torch.zeros(per_epoch)), batch_size=1, num_workers=0)
    print(f"UNet stage: {len(module.train_latents)} training latents ({unet_config['sample_size']}x"
          f"{unet_config['sample_size']}) and {config.val_count} held out, {len(val_items)} validation prompts, "
          f"from {split}; UNet {sum(p.numel() for p in module.net['unet'].parameters()) / 1e6:.2f} M, "
          f"text encoder {sum(p.numel() for p in module.net['text_encoder'].parameters()) / 1e6:.2f} M parameters",
          file=sys.stderr)
    accelerator = resolve_accelerator(args.accelerator)
    trainer = make_trainer(args, out=out, precision=lightning_precision(accelerator, args.precision),
                           max_steps=config.max_steps, checkpoint_every=config.val_every,
                           callbacks=[ValidateAndExportUNet(out, info)], val_every=config.val_every,
                           gradient_clip_val=config.grad_clip or None)
    trainer.fit(module, train_dataloaders=pace, val_dataloaders=val_loader, ckpt_path=resume)
    if trainer.is_global_zero:
        print(f"done: {out / 'model'} (EMA model, diffusers fp16), best: {out / 'best_model'}, "
              f"curve: {out / 'val_curve.csv'}")


# ------------------------------------------------------------------------------------------------ CLI

def build_parser(stage: str = "vae") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="vae",
                   help="vae: the AutoencoderKL; unet: the UNet and text encoder on the frozen VAE. "
                        "The defaults below are those of --stage " + stage)
    p.add_argument("--vae", default=None,
                   help="--stage unet: the frozen VAE, a best_vae.safetensors of --stage vae (not needed to resume)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, curve, samples, logs)")
    p.add_argument("--data", default=None,
                   help="a Fill50k-layout root (holding training/) or split folder (holding prompt.json); "
                        "default: generate <out>/data with make_fill50k.py --preset mini")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's choice); 1 leaves the other cores to other work")
    add_config_flags(p, STAGE_CONFIGS[stage], f"hyper-parameters (defaults of --stage {stage})")
    add_trainer_flags(p, "auto: bf16 mixed on GPUs from Ampere on, else fp32", resume_may_change=RESUME_MAY_CHANGE)
    return p


def parse_config(argv) -> tuple[argparse.Namespace, MiniSDTrainConfig]:
    stage = pre_parse(argv, ("--stage", "vae")).stage
    stage = stage if stage in STAGES else "vae"  # an unknown stage is reported by the full parser
    args = build_parser(stage).parse_args(argv)
    resolve_num_workers(args, decodes=False)  # images and latents are held in memory
    return args, config_from_args(STAGE_CONFIGS[args.stage], args)


def check_config(config: MiniSDTrainConfig) -> None:
    if config.size < 16 or config.size % 8:
        raise UserError(f"--size must be a multiple of 8 and at least 16, got {config.size}")
    check_cooldown(config.cooldown_from, config.max_steps)
    config.vae_config()
    config.unet_config(config.size // 8)
    config.text_config()


class VAEData(pl.LightningDataModule):
    """The VAE stage's images: training batches drawn from (--seed, step) (common.step_batches), so a resumed
    run sees the batches an uninterrupted one would; the validation images in order."""

    def __init__(self, train_set, val_set, batch_size: int, seed: int, num_workers: int):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self):
        from common.step_batches import BatchStream, step_batch_loader
        return step_batch_loader(self.trainer, BatchStream(self.train_set, self.batch_size, self.seed),
                                 self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64, num_workers=0)


def resume_stage(resume, stage: str, args, config: MiniSDTrainConfig) -> tuple[dict, MiniSDTrainConfig]:
    """The --resume checkpoint of this stage (memory-mapped, read before anything is written) and the config the
    run goes on with (common.config.resumed_config; --seed from the checkpoint too). Another stage's or
    program's checkpoint, a truncated file or a changed setting is a one-line UserError."""
    program = f"{PROGRAM} --stage {stage}"
    needs = ("train", "vae_config") + (("unet_config", "text_config", "vae_source") if stage == "unet" else ())
    ckpt = read_resume_checkpoint(resume, program, needs)
    hparams = ckpt["hyper_parameters"]
    if ("unet_config" in hparams) != (stage == "unet"):
        raise UserError(f"{resume}: not a checkpoint of {program} (it is one of the other stage)")
    config = resumed_config(config, hparams["train"], args.given, may_change=RESUME_MAY_CHANGE, source=resume,
                            program=PROGRAM)
    resumed_args(args, {k: hparams[k] for k in ("seed",) if k in hparams}, args.given, source=resume)
    check_cooldown(config.cooldown_from, config.max_steps)
    note_if_finished(resume, ckpt, config.max_steps)
    return ckpt, config


def stage_data(args, config: MiniSDTrainConfig, out: Path) -> Path:
    """The split a stage trains on: --data, or make_fill50k data generated into <out>/data (checked first, so
    a run that cannot use it does not draw thousands of images)."""
    if args.data is not None:
        from p3_controlnet.data import resolve_split
        return resolve_split(args.data)
    if config.n_images <= config.val_count + config.batch_size:
        raise UserError(f"--n-images {config.n_images}: need more than --val-count {config.val_count} + "
                        f"--batch-size {config.batch_size}")
    ensure_dir(out)
    return generated_data(out / "data", config.n_images, config.size, config.data_seed)


def train_vae(args, config: MiniSDTrainConfig, out: Path) -> None:
    resume = resolve_resume(args.resume, out)
    vae_config = config.vae_config()
    if resume is not None:  # the network and its settings are the checkpoint's
        ckpt, config = resume_stage(resume, "vae", args, config)
        vae_config = ckpt["hyper_parameters"]["vae_config"]
    seed_everything(args.seed)
    split = stage_data(args, config, out)
    ensure_dir(out)
    images, _ = load_targets(split, config.size)
    if len(images) <= config.val_count:
        raise UserError(f"{split}: {len(images)} items, not more than --val-count {config.val_count}")
    data = VAEData(TensorDataset(images[:-config.val_count]), TensorDataset(images[-config.val_count:]),
                   config.batch_size, args.seed, args.num_workers)
    print(f"VAE stage: {len(data.train_set)} training and {len(data.val_set)} validation images ({config.size} px) "
          f"from {split}", file=sys.stderr)

    module = MiniVAEModule(vae_config=vae_config, train=dataclasses.asdict(config), seed=args.seed)
    accelerator = resolve_accelerator(args.accelerator)
    trainer = make_trainer(args, out=out, precision=lightning_precision(accelerator, args.precision),
                           max_steps=config.max_steps, checkpoint_every=config.val_every,
                           callbacks=[ValidateAndExport(out)], val_every=config.val_every,
                           gradient_clip_val=config.grad_clip or None, seed_steps=True)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.global_step == config.max_steps and config.max_steps % config.val_every:
        # a last step off the --val-every grid: validated (and exported) too, as an uninterrupted run would be
        trainer.validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print(f"done: {out / 'vae.safetensors'} (EMA VAE), best: {out / 'best_vae.safetensors'}, "
              f"curve: {out / 'val_curve.csv'}")


@cli_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_config(argv)
    args.argv = argv
    args.given = explicit_flags(lambda: build_parser(args.stage), argv)
    check_config(config)
    if args.stage == "vae" and args.vae is not None:
        raise UserError("--vae is an input of --stage unet")
    if args.stage == "unet" and args.vae is None and args.resume is None:
        raise UserError("--stage unet needs --vae: the best_vae.safetensors of a --stage vae run")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for worker processes started later
    out = check_writable(args.out)
    setup_cuda_fast_math()
    # each stage reads its --resume checkpoint (and may take the seed from it) before it seeds and writes
    (train_unet if args.stage == "unet" else train_vae)(args, config, out)


if __name__ == "__main__":
    main()
