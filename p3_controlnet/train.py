#!/usr/bin/env python
"""Train a ControlNet on a frozen Stable Diffusion v1.4 with Fill50k-style data (course layout).

    python p3_controlnet/train.py --sd sd-v1-4.ckpt --out runs/p3 --max-steps 6000     # generates runs/p3/fill50k
    python p3_controlnet/train.py --sd sd-v1-4.ckpt --data hw2_data/fill50k --out runs/p3 --max-steps 6000

--sd is the single-file sd-v1-4.ckpt (LDM keys) or a diffusers folder; nothing is downloaded.
Without --data, a Fill50k-style set (--generate-n samples at --size, generator seed --seed) is drawn by
make_fill50k.py into <out>/fill50k once and reused by later runs (--resume included) with the same settings.
Only the ControlNet (a copy of the UNet encoder with zero convolutions, or --init-from a trained one) is
trained; SD is frozen. With --ema-decay, the EMA of its weights is what is validated, exported and sampled.
Writes to --out:
  controlnet/            the ControlNet (diffusers folder) after every --sample-every steps: what infer.py /
                         hw2_3.sh load (pass it as their CONTROLNET argument)
  samples/step_XXXXXX.png  control | generated | target for the held-out validation items
  last.ckpt              Lightning checkpoint (ControlNet, its EMA and optimiser; not SD) for --resume
  logs/                  CSV of train and validation losses
  fill50k/               the generated training set (only without --data)
On CUDA (GPUs from Ampere on; older ones run fp32): bf16 autocast with the trainable weights in fp32 (frozen
SD stored in bf16), SDPA attention,
gradient checkpointing, fused AdamW; --devices N runs DDP. Each distinct prompt's CLIP embedding is
computed once at start-up (the text encoder is then dropped).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

import common.stable_diffusion as sdlib
from common.checkpoint import check_resume_fits, load_into, note_if_finished, read_resume_checkpoint
from common.config import (
    AT_LEAST_1,
    BELOW_1,
    NON_NEGATIVE,
    SHARE,
    HelpFormatter,
    add_config_flags,
    config_from_args,
    explicit_flags,
    int_at_least,
    resumed_args,
    resumed_config,
)
from common.device import fused_adamw_pays, lightning_precision, setup_cuda_fast_math
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir, write_text_atomic
from common.images import save_grid, to_uint8
from common.lightning_utils import (
    EMA,
    UpdateEmaEachStep,
    add_trainer_flags,
    check_cooldown,
    lr_factor,
    make_trainer,
    resolve_accelerator,
    resolve_num_workers,
    resolve_resume,
)
from common.schedules import training_target
from common.seeding import seed_everything, validation_generator
from p3_controlnet.data import Fill50kDataModule
from p3_controlnet.make_fill50k import write_split
from p3_controlnet.model import (
    ControlledUNet,
    build_controlnet,
    load_controlnet,
    sample_controlnet_images,
    save_controlnet,
    use_sdpa,
)


@dataclass(frozen=True)
class P3TrainConfig:
    """Every hyper-parameter of a P3 training run: the flags of this script, saved in last.ckpt (and in the
    hparams.yaml of the CSV log)."""

    size: int | None = field(default=None, metadata={"aliases": ("--resolution",),
        "help": "training resolution, images are resized to it (default: the SD's native resolution, 512 for SD "
                "v1.4, 64 for the mini SD; recorded resolved)"})
    generate_n: int = field(default=50000, metadata={
        "range": AT_LEAST_1,
        "help": "without --data: how many training samples to generate (Fill50k has 50000); drawn at --size with "
                "generator seed --seed"})
    max_steps: int = field(default=6000, metadata={"range": AT_LEAST_1, "help": "optimiser steps"})
    batch_size: int = field(default=4, metadata={"range": AT_LEAST_1, "help": "images per step (per device)"})
    accumulate: int = field(default=1, metadata={
        "range": AT_LEAST_1, "help": "gradient accumulation (effective batch = batch x devices x this)"})
    lr: float = field(default=1e-5, metadata={
        "range": NON_NEGATIVE, "help": "AdamW learning rate (ControlNet paper: 1e-5)"})
    cooldown_from: int | None = field(default=None, metadata={
        "metavar": "STEP", "help": "from this step the rate falls linearly to 0 at --max-steps (none: constant); "
                                   "can be added when resuming a constant-rate run"})
    weight_decay: float = field(default=1e-2, metadata={
        "range": NON_NEGATIVE, "help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={
        "range": NON_NEGATIVE, "help": "clip the gradient norm to this (0: off)"})
    proportion_empty_prompts: float = field(default=0.0, metadata={
        "range": SHARE,
        "help": "probability of training a sample with the empty prompt (the paper uses 0.5 to make the "
                "ControlNet read content from the control image; the Fill50k tutorial 0)"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "recompute activations in the backward pass (--no-gradient-checkpointing: faster, much more "
                "memory)"})
    val_count: int = field(default=8, metadata={
        "range": AT_LEAST_1, "help": "training items held out for validation loss and samples"})
    ema_decay: float = field(default=0.0, metadata={
        "range": BELOW_1,
        "help": "keep an exponential moving average of the ControlNet's weights with this decay (e.g. 0.999) "
                "and validate, export and sample it instead of the weights themselves (0: off, as in the "
                "ControlNet paper; costs one more copy of the ControlNet in memory)"})
    sample_every: int = field(default=500, metadata={
        "range": AT_LEAST_1, "aliases": ("--val-every",),
        "help": "validate, export controlnet/ and draw samples every N steps"})
    sample_steps: int = field(default=20, metadata={
        "range": NON_NEGATIVE, "help": "DDIM steps of the sample images (0: no images)"})
    sample_guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance of the sample images"})
    checkpoint_every: int | None = field(default=None, metadata={
        "range": AT_LEAST_1, "metavar": "N", "help": "write last.ckpt every N steps (off: every --sample-every steps)"})


def load_init_controlnet(controlnet, path: str) -> None:
    """Copy the weights of the ControlNet folder `path` (train.py's OUT/controlnet) into `controlnet`, the one
    built for this SD: every tensor there, of the same shape and finite, or a one-line UserError (load_into)."""
    load_into(controlnet, load_controlnet(path).state_dict(), f"{path} (--init-from)")


class ControlNetModule(UpdateEmaEachStep, pl.LightningModule):
    """The diffusion loss (on the noise for SD v1; on v for a v-prediction SD) of SD's UNet steered by a trainable
    ControlNet; only the ControlNet learns.

    frozen_dtype: the dtype SD's UNet and VAE are held in (bf16 under bf16 autocast); text_batch: prompts
    encoded at once when the text embeddings are cached; init_from: a ControlNet folder whose weights the
    trained one starts from (--init-from) instead of the copy of the UNet encoder."""

    def __init__(self, *, sd, prompts: list[str], empty_prompt_id: int, config: P3TrainConfig | None = None,
                 frozen_dtype: torch.dtype = torch.float32, text_batch: int = 64, init_from: str | None = None,
                 run: dict | None = None):
        super().__init__()
        self.config = config if config is not None else P3TrainConfig()
        # the config as a plain dict, not the dataclass: checkpoints then load without this module's classes;
        # run: the flags outside the config that --resume checks (seed, limit)
        self.save_hyperparameters({"train": dataclasses.asdict(self.config), "empty_prompt_id": empty_prompt_id,
                                   "text_batch": text_batch, "run": run or {}})
        sd.freeze()
        self.vae, self.text_encoder, self.tokenizer = sd.vae, sd.text_encoder, sd.tokenizer
        self.noise_scheduler = sd.noise_scheduler
        self.vae_scale_factor = sd.vae_scale_factor
        controlnet = build_controlnet(sd.unet, sd.vae_scale_factor)
        if init_from is not None:
            load_init_controlnet(controlnet, init_from)
        self.net = ControlledUNet(sd.unet, controlnet)
        use_sdpa(self.net.unet, self.net.controlnet)
        for m in (sd.unet, sd.vae):  # the text encoder stays fp32: it runs once per prompt, then is dropped
            sdlib.cast(m, frozen_dtype)
        self.cache_dtype = frozen_dtype
        if self.config.gradient_checkpointing:
            # the frozen UNet too: gradients reach the ControlNet through its decoder
            self.net.controlnet.enable_gradient_checkpointing()
            self.net.unet.enable_gradient_checkpointing()
        self.ema = EMA(self.net.controlnet, self.config.ema_decay) if self.config.ema_decay > 0 else None
        self.prompts = list(prompts)
        self.text_cache: torch.Tensor | None = None  # (num_prompts, 77, D), filled at fit start
        self.register_buffer("alphas_cumprod", sd.noise_scheduler.alphas_cumprod.float().clone(), persistent=False)
        self.prediction = sd.prediction  # eps for SD v1; v for a v-prediction SD (its scheduler says)
        self.strict_loading = False  # checkpoints hold the ControlNet only

    # ---- text embeddings, once per distinct prompt
    @torch.no_grad()
    def cache_text_embeddings(self) -> None:
        if self.text_cache is not None:
            return
        te = self.text_encoder.to(self.device)
        out = []
        for i in range(0, len(self.prompts), self.hparams.text_batch):
            chunk = self.prompts[i:i + self.hparams.text_batch]
            out.append(sdlib.encode_prompts(self.tokenizer, te, chunk, self.device).to(self.cache_dtype).cpu())
        self.text_cache = torch.cat(out)
        self.text_encoder = None  # not needed any more: frees its memory on the device

    def on_fit_start(self) -> None:
        self.cache_text_embeddings()

    def context(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.text_cache[prompt_ids.cpu()].to(self.device, non_blocking=True)

    # ---- loss
    def evaluated_net(self) -> ControlledUNet:
        """The ControlNet that is validated, exported and sampled: the EMA copy when there is one."""
        return self.net if self.ema is None else ControlledUNet(self.net.unet, self.ema.module)

    def diffusion_loss(
        self, batch, generator: torch.Generator | None = None, drop_prompts: bool = False,
        net: ControlledUNet | None = None,
    ) -> torch.Tensor:
        control, target, pid = batch["control"], batch["target"], batch["prompt_id"]
        b = target.shape[0]
        with torch.no_grad():
            latents = sdlib.encode_images(self.vae, target, generator=generator).float()
        if drop_prompts and self.config.proportion_empty_prompts > 0:
            drop = torch.rand(b, device=pid.device) < self.config.proportion_empty_prompts
            pid = torch.where(drop, torch.full_like(pid, self.hparams.empty_prompt_id), pid)
        context = self.context(pid)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), device=self.device, generator=generator)
        noise = torch.randn(latents.shape, device=self.device, generator=generator)
        ab = self.alphas_cumprod[t][:, None, None, None]
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        net = net if net is not None else self.net
        out = net(noisy, t, context, control.to(net.controlnet.dtype))
        return F.mse_loss(out.float(), training_target(latents, noise, ab, self.prediction))

    def training_step(self, batch, batch_idx):
        loss = self.diffusion_loss(batch, drop_prompts=True)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["target"]))
        return loss

    def ema_source(self):
        return self.net.controlnet

    def validation_step(self, batch, batch_idx):
        g = validation_generator(batch_idx, self.device)  # the latent sample too is drawn from it
        loss = self.diffusion_loss(batch, generator=g, net=self.evaluated_net())
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(batch["target"]))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for a fused optimiser (the CUDA AdamW: it would
        # unscale fp16 gradients itself); bf16 has no gradient scaler, so the gradients are already the true
        # ones and the same norm clipping Lightning does applies as is
        if gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        params = [p for p in self.net.controlnet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                fused=fused_adamw_pays(self.device))
        c = self.config
        if c.cooldown_from is None:
            return opt
        # the factor of the trainer's step, not of the scheduler's own count: a constant-rate run, whose
        # checkpoint holds no scheduler, then resumes into the cooldown at the right step
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda _: lr_factor(self.global_step if self._trainer is not None else 0, 0, c.cooldown_from,
                                     c.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints: the ControlNet, its EMA and the optimiser only (SD is reloaded from --sd)
    @staticmethod
    def trained_key(name: str) -> bool:
        return name.startswith(("net.controlnet.", "ema."))

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.trained_key(k)}

    def on_load_checkpoint(self, checkpoint) -> None:
        if not any(k.startswith("net.controlnet.") for k in checkpoint.get("state_dict", {})):
            raise UserError(
                "--resume: the checkpoint holds no ControlNet weights (not written by p3_controlnet/train.py?)"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.vae, self.net.unet, self.text_encoder, self.ema):
            if m is not None:
                m.eval()  # frozen parts (and the EMA copy) stay in eval mode (no dropout)
        return self


class ExportControlNetAndSamples(Callback):
    """Every `every` steps and at the end (rank 0): export the ControlNet to <out>/controlnet; draw `steps`-step
    samples (guidance `guidance`, seeds seed + i) for the first `count` held-out items (steps 0: none)."""

    def __init__(self, *, out: Path, val_set, every: int, steps: int, guidance: float, seed: int, count: int = 4,
                 info: dict | None = None):
        self.out, self.val_set, self.every, self.steps, self.guidance, self.seed = (
            out,
            val_set,
            every,
            steps,
            guidance,
            seed,
        )
        self.count = min(count, len(val_set))
        self.info = info or {}  # recorded in the exported folder, with the step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step > 0 and getattr(self, "_last", None) != step:
            self._last = step
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(self, "_last", None) != trainer.global_step:
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        net = pl_module.evaluated_net()
        save_controlnet(net.controlnet, self.out / "controlnet",
                        info={**self.info, "global_step": trainer.global_step, "ema": pl_module.config.ema_decay > 0})
        if self.count == 0 or self.steps == 0:
            return
        items = [self.val_set[i] for i in range(self.count)]
        dev = pl_module.device
        control = torch.stack([it["control"] for it in items]).to(dev)
        cond = pl_module.context(torch.tensor([it["prompt_id"] for it in items]))
        uncond = pl_module.context(torch.full((self.count,), pl_module.hparams.empty_prompt_id))
        # the autocast training runs under (Lightning's bf16-mixed, on any device): the frozen UNet and the
        # text cache are bf16 then, while the latents and the ControlNet are fp32
        amp_dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else None
        was_training = net.controlnet.training
        net.controlnet.eval()
        sched = sdlib.make_ddim_scheduler(pl_module.noise_scheduler)
        imgs = sample_controlnet_images(
            net,
            pl_module.vae,
            sched,
            cond,
            uncond,
            control,
            [self.seed + i for i in range(self.count)],
            steps=self.steps,
            guidance=self.guidance,
            amp_dtype=amp_dtype,
        )
        net.controlnet.train(was_training)
        target = torch.stack([it["target"] for it in items]).to(dev)
        rows = torch.stack([control * 2 - 1, imgs.to(dev).float(), target], 1)
        save_grid(self.out / "samples" / f"step_{trainer.global_step:06d}.png",
                  to_uint8(rows.flatten(0, 1).float()), self.count, 3, col_labels=["control", "generated", "target"])


def generated_fill50k(root: Path, n: int, size: int, seed: int) -> Path:
    """<root>/training/ drawn by make_fill50k.py: reused when <root>/settings.json records the same n, size
    and seed, otherwise (re)generated; settings.json is written last, so an interrupted run regenerates."""
    settings = {"generator": "p3_controlnet/make_fill50k.py", "n": n, "size": size, "seed": seed}
    record = root / "settings.json"
    try:
        done = json.loads(record.read_text()) == settings and (root / "training" / "prompt.json").is_file()
    except (OSError, ValueError):
        done = False
    if done:
        print(f"--data not given: reusing {n} generated Fill50k samples ({size}x{size}, seed {seed}) in {root}",
              file=sys.stderr)
        return root
    print(f"--data not given: generating {n} Fill50k samples ({size}x{size}, seed {seed}) into {root} with "
          f"make_fill50k.py (once; later runs with the same settings reuse them)", file=sys.stderr)
    record.unlink(missing_ok=True)
    write_split(ensure_dir(root) / "training", n, size, seed, progress=True)
    write_text_atomic(record, json.dumps(settings) + "\n")
    return root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt (LDM keys) or a diffusers folder")
    p.add_argument("--data", default=None,
                   help="fill50k root (holding training/) or a split folder with prompt.json (default: generate "
                        "one into <out>/fill50k, see --generate-n)")
    p.add_argument(
        "--out", required=True, help="output folder (controlnet/, samples/, last.ckpt, logs/; fill50k/ without --data)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the ControlNet and UNet (CUDA, long runs)")
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="use only the first N lines of prompt.json (quick runs; default: all)")
    p.add_argument("--init-from", default=None, metavar="CONTROLNET",
                   help="start from this ControlNet folder (a train.py OUT/controlnet on the same base model) with "
                        "a fresh optimiser and step 0, instead of a copy of the UNet encoder; ignored when "
                        "--resume finds a checkpoint")
    add_config_flags(p, P3TrainConfig(), "hyper-parameters")
    add_trainer_flags(p, "auto: bf16 mixed on GPUs from Ampere on (trainable weights fp32, frozen SD bf16), else fp32",
                      resume_may_change=RESUME_MAY_CHANGE)
    return p


PROGRAM = "p3_controlnet/train.py"
# what a --resume may change: how long the run goes on and how it samples and checkpoints
RESUME_MAY_CHANGE = ("max_steps", "cooldown_from", "sample_every", "sample_steps", "sample_guidance",
                     "checkpoint_every")


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    given = explicit_flags(build_parser, argv)
    resolve_num_workers(args)
    config = config_from_args(P3TrainConfig(), args)
    # the frozen SD is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if config.size is not None and (config.size < 8 or config.size % 8):
        raise UserError(f"--size must be a positive multiple of 8, got {config.size}")
    out = check_writable(args.out)
    setup_cuda_fast_math()
    resume = resolve_resume(args.resume, out)
    # read and checked now: a truncated or foreign --resume checkpoint fails before anything is written
    resume_ckpt = read_resume_checkpoint(resume, PROGRAM, ("train", "empty_prompt_id")) if resume else None
    if resume_ckpt is not None:
        hp = resume_ckpt["hyper_parameters"]
        config = resumed_config(config, hp["train"], given, may_change=RESUME_MAY_CHANGE, source=resume,
                                program=PROGRAM)
        resumed_args(args, hp.get("run") or {}, given, source=resume)
        note_if_finished(resume, resume_ckpt, config.max_steps)
    check_cooldown(config.cooldown_from, config.max_steps)
    seed_everything(args.seed)
    accelerator = resolve_accelerator(args.accelerator)
    precision = lightning_precision(accelerator, args.precision)
    frozen_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32

    if args.data is None and config.generate_n < config.val_count + config.batch_size:
        raise UserError(f"--generate-n {config.generate_n}: need at least --val-count {config.val_count} "
                        f"+ --batch-size {config.batch_size} samples")

    if args.quiet:
        sdlib.quiet_libraries()

    def load_sd():
        t0 = time.time()
        sd = sdlib.load_sd(args.sd)
        return sd, time.time() - t0

    sd, load_seconds = load_sd()  # first: a bad --sd fails before minutes of data generation or reading
    if config.size is None:
        config = dataclasses.replace(config, size=sd.native_resolution)
    multiple = sd.size_multiple
    if config.size % multiple:
        raise UserError(f"--size must be a multiple of {multiple} for this SD (its UNet down-samples the "
                        f"latents {len(sd.unet.config.block_out_channels) - 1} times), got {config.size}")
    data_root = args.data
    if data_root is None:
        data_root = generated_fill50k(out / "fill50k", config.generate_n, config.size, args.seed)
    data = Fill50kDataModule(
        data_root, config.size, config.batch_size, config.val_count, args.seed, args.num_workers, args.limit
    )
    print(f"loaded SD from {args.sd} in {load_seconds:.1f} s; {len(data.train_set)} training items, "
          f"{len(data.prompts) - 1} distinct prompts", file=sys.stderr)
    module = ControlNetModule(sd=sd, prompts=data.prompts, empty_prompt_id=data.empty_prompt_id, config=config,
                              frozen_dtype=frozen_dtype, init_from=None if resume else args.init_from,
                              run={"seed": args.seed, "limit": args.limit})
    if resume_ckpt is not None:  # a checkpoint of other settings fails here, not inside Lightning
        check_resume_fits(resume, resume_ckpt, module, PROGRAM, keys=ControlNetModule.trained_key)
        del resume_ckpt
    ensure_dir(out)
    if args.compile:
        module.net.controlnet.compile()
        module.net.unet.compile()

    info = {"program": PROGRAM, "sd": str(Path(args.sd).resolve()), "data": str(Path(data_root).resolve()),
            "seed": args.seed, "limit": args.limit, "train": dataclasses.asdict(config)}
    export = ExportControlNetAndSamples(out=out, val_set=data.val_set, every=config.sample_every,
                                        steps=config.sample_steps, guidance=config.sample_guidance, seed=args.seed,
                                        info=info)
    # Lightning counts validation intervals in batches, not optimiser steps
    trainer = make_trainer(args, out=out, precision=precision, max_steps=config.max_steps,
                           checkpoint_every=config.checkpoint_every or config.sample_every, callbacks=[export],
                           val_every=config.sample_every * config.accumulate,
                           log_every_n_steps=min(25, config.sample_every),
                           accumulate_grad_batches=config.accumulate, gradient_clip_val=config.grad_clip or None,
                           seed_steps=True)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.is_global_zero:
        print(f"done at step {trainer.global_step}: ControlNet in {out / 'controlnet'} "
              f"(use: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT {out / 'controlnet'})")


if __name__ == "__main__":
    main()
