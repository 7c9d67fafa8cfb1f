#!/usr/bin/env python
"""Textual inversion on a frozen Stable Diffusion v1.x: learn a new token from a handful of photos.

    python p5_personalization/train_ti.py --sd sd-v1-4.ckpt --images hw2_data/textual_inversion/0 \\
        --token "<new1>" --init-word dog --vectors 1 --steps 3000 --out checkpoints/textual_inversion
    python p5_personalization/train_ti.py --sd sd-v1-4.ckpt --images ".../1" --token "<new2>" \\
        --init-word painting --property style --out checkpoints/textual_inversion

Only the new token's vectors learn; the UNet, VAE, text encoder and every other embedding row stay
bit-identical. Each step: an augmented photo (random crop and scale, horizontal flip), a caption from
the object or style templates with the token in it ("a photo of a <new1>", "a painting in the style
of <new2>"), the usual noise-prediction loss of the frozen UNet; the gradient reaches the token through
the text encoder. SD is loaded offline as P3 does (common.stable_diffusion; --sd is sd-v1-4.ckpt, a
.safetensors or a diffusers folder).

Several concepts at once: repeat --images/--token/--init-word (and --property) once per concept. With
--method ti they are independent embeddings trained side by side; with --method joint-kv the
cross-attention key and value projections of the UNet are fine-tuned too, shared by the concepts (the
multi-concept recipe of Custom Diffusion, Kumari et al. 2023, meant to help several concepts appear
together in one prompt; the real-image regularisation of that paper is not implemented). No comparison
of the two methods has been run here: score both with scripts/evaluate_ti.py to see which composes better.

Writes to --out (the folder hw2_ti.sh reads):
  <token name>.safetensors / .json   the learned vectors in diffusers' textual-inversion format (+ how)
  cross_attn_kv.safetensors / .json  with --method joint-kv: the fine-tuned UNet K/V weights
  runs/<run>/last.ckpt               Lightning state for --resume (only the trained tensors + optimiser)
  runs/<run>/samples/step_XXXXXX.png with --sample-every: images from --sample-prompt
On CUDA: bf16 autocast with the frozen UNet and VAE held in bf16, SDPA attention; --gradient-checkpointing
trades compute for memory.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common.stable_diffusion as sdlib  # noqa: E402  (sets the offline environment first)
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from common.device import autocast, lightning_precision, setup_cuda_fast_math  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from common.fileio import check_writable, ensure_dir  # noqa: E402
from common.lightning_utils import AtomicCheckpointIO, add_trainer_flags, devices_and_strategy, last_checkpoint_callback, lr_factor, resolve_resume  # noqa: E402
from common.seeding import sample_seed, seed_everything  # noqa: E402
from p5_personalization.concepts import IMAGE_SUFFIXES, TOKEN_RE, token_file_stem  # noqa: E402
from p5_personalization.textual_inversion import (KV_FILE, add_tokens, check_new_token,  # noqa: E402
                                                  cross_attention_kv_names, expand_prompt, init_vectors, save_embedding,
                                                  save_kv)

# caption templates of the textual-inversion paper's code (object and style), shortened
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
METHODS = ("ti", "joint-kv")


# ----------------------------------------------------------------------------------------------------- data

def list_concept_images(folder: str) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{d}: --images folder not found")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{d}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the --images folder")
    return files


class ConceptImages(torch.utils.data.Dataset):
    """An endless, seeded stream of augmented concept photos with captions: item `pos` of the stream.

    The photos (of all concepts) are visited in a fresh seeded order every round; the crop, flip and
    caption template of item `pos` come from a generator seeded by (seed, pos). So the stream is a pure
    function of the seed, and a run resumed at step s reads exactly what an uninterrupted run would have.
    """

    def __init__(self, concepts: list[dict], resolution: int, seed: int = 0, flip_p: float = 0.5,
                 min_scale: float = 0.6, length: int = 10 ** 9):
        from PIL import Image, UnidentifiedImageError
        self.resolution, self.seed, self.flip_p, self.min_scale, self.length = resolution, seed, flip_p, min_scale, length
        self.items = []  # (concept, photo)
        for c in concepts:
            for f in list_concept_images(c["images"]):
                try:
                    with Image.open(f) as im:
                        im = im.convert("RGB")
                except (UnidentifiedImageError, OSError) as e:
                    raise UserError(f"{f}: not a readable image ({e})") from None
                # keep a copy a little larger than the crops, so each step's resize is cheap
                scale = 1.25 * resolution / min(im.size)
                if scale < 1:
                    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
                self.items.append((c, im))
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.length

    def _order(self, round_: int) -> list[int]:
        if round_ not in self._orders:
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}/order/{round_}").shuffle(order)
            self._orders = {round_: order}
        return self._orders[round_]

    def __getitem__(self, pos: int) -> dict:
        import torchvision.transforms.functional as TF
        round_, k = divmod(pos, len(self.items))
        concept, im = self.items[self._order(round_)[k]]
        g = random.Random(f"{self.seed}/item/{pos}")
        # random square crop covering min_scale..1 of the shorter side, resized to the training resolution
        crop = max(1, int(min(im.size) * g.uniform(self.min_scale, 1.0)))
        left, top = g.randint(0, im.width - crop), g.randint(0, im.height - crop)
        im = im.crop((left, top, left + crop, top + crop)).resize((self.resolution, self.resolution), 3)
        if g.random() < self.flip_p:
            im = TF.hflip(im)
        x = TF.to_tensor(im) * 2 - 1
        caption = g.choice(TEMPLATES[concept["property"]]).format(concept["token"])
        return {"pixel_values": x, "prompt": caption}


class StreamLoader(torch.utils.data.DataLoader):
    """A DataLoader over stream positions start, start+1, ...; its place in the stream is set from the step
    it resumes at, so it has no state of its own to save (the empty state_dict tells Lightning so)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ConceptDataModule(pl.LightningDataModule):
    def __init__(self, concepts: list[dict], resolution: int, batch_size: int, seed: int, num_workers: int = 0,
                 flip_p: float = 0.5, steps: int = 1000):
        super().__init__()
        self.concepts, self.resolution, self.batch_size = concepts, resolution, batch_size
        self.seed, self.num_workers, self.flip_p, self.steps = seed, num_workers, flip_p, steps
        self.dataset = None

    def setup(self, stage=None):
        if self.dataset is None:
            self.dataset = ConceptImages(self.concepts, self.resolution, self.seed, self.flip_p,
                                         length=self.steps * self.batch_size)

    def train_dataloader(self):
        # Lightning restores the step before it asks for the loader, so a resumed run starts where it stopped
        done = self.trainer.global_step if self.trainer is not None else 0
        positions = range(min(done * self.batch_size, len(self.dataset) - 1), len(self.dataset))
        return StreamLoader(self.dataset, batch_size=self.batch_size, sampler=positions, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)


# ---------------------------------------------------------------------------------------------------- model

class TextualInversionModule(pl.LightningModule):
    """Frozen SD + trainable token vectors (+ the cross-attention K/V with method 'joint-kv').

    The SD components live outside the module tree (`self.sd`), so Lightning checkpoints hold only what
    is trained; `self.token_vectors` is the same Parameter the text encoder's NewTokenEmbedding uses.
    """

    def __init__(self, sd_path: str, concepts: list[dict], method: str = "ti", lr: float = 5e-3,
                 kv_lr: float = 1e-5, weight_decay: float = 1e-2, warmup_steps: int = 0,
                 gradient_checkpointing: bool = False, frozen_dtype: str = "fp32", seed: int = 0, components=None):
        super().__init__()
        self.save_hyperparameters(ignore=["components"])
        if method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}")
        sd = components if components is not None else sdlib.load_sd(sd_path)
        sd.freeze()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[frozen_dtype]
        for m in (sd.unet, sd.vae):
            if m.dtype != dtype:
                m.to(dtype)
        te = sd.text_encoder
        base = te.get_input_embeddings().weight.detach()
        init = {}
        for c in concepts:
            check_new_token(sd.tokenizer, c["token"], c["vectors"])
            init[c["token"]] = init_vectors(sd.tokenizer, base, c["init_word"], c["vectors"])
        self.token_ids = add_tokens(sd.tokenizer, te, init, trainable=True)
        self.num_vectors = {c["token"]: c["vectors"] for c in concepts}
        self.token_vectors = te.get_input_embeddings().new          # registered here: trained and checkpointed
        self.kv = torch.nn.ParameterDict()
        if method == "joint-kv":
            params = dict(sd.unet.named_parameters())
            for n in cross_attention_kv_names(sd.unet):
                p = params[n]
                p.data = p.data.float()  # trained in fp32 even when the rest of the UNet is held in bf16
                p.requires_grad_(True)
                self.kv[n.replace(".", "__")] = p
        if gradient_checkpointing:
            sd.unet.enable_gradient_checkpointing()
            # transformers checkpoints only in train mode; CLIP's text encoder has no dropout, so train mode
            # changes nothing else
            te.activation_checkpointing_enable({"use_reentrant": False})
            te.train()
        self.sd = sd

    # the frozen components follow the module to its device
    def on_fit_start(self) -> None:
        for m in (self.sd.unet, self.sd.vae, self.sd.text_encoder):
            m.to(self.device)

    def diffusion_loss(self, pixels: torch.Tensor, prompts: list[str], generator=None) -> torch.Tensor:
        sd = self.sd
        with torch.no_grad():
            latents = sdlib.encode_images(sd.vae, pixels.to(self.device), generator=generator).float()
        noise = torch.randn(latents.shape, device=self.device, generator=generator)
        sched = sd.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), device=self.device, generator=generator)
        noisy = sched.add_noise(latents, noise, t)
        ids = sdlib.tokenize(sd.tokenizer, [expand_prompt(p, self.num_vectors) for p in prompts]).to(self.device)
        context = sd.text_encoder(ids)[0]
        pred = sd.unet(noisy.to(sd.unet.dtype), t, encoder_hidden_states=context.to(sd.unet.dtype)).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch, batch_idx):
        # the step's noise, timesteps and latent sample depend on (seed, step) only: resumed runs match
        g = torch.Generator(self.device).manual_seed(sample_seed(self.hparams.seed, self.global_step))
        loss = self.diffusion_loss(batch["pixel_values"], batch["prompt"], generator=g)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["prompt"]))
        return loss

    def configure_optimizers(self):
        h = self.hparams
        groups = [{"params": [self.token_vectors], "lr": h.lr, "weight_decay": h.weight_decay}]
        if len(self.kv):
            groups.append({"params": list(self.kv.values()), "lr": h.kv_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, h.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def learned(self) -> dict[str, torch.Tensor]:
        """token -> (N, D) current vectors (fp32, CPU)."""
        v = self.token_vectors.detach().float().cpu()
        out, start = {}, 0
        for token, n in self.num_vectors.items():
            out[token] = v[start:start + n].clone()
            start += n
        return out

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, steps: int = 25, guidance: float = 7.5, resolution: int = 512):
        """Images in [-1, 1] from the current embeddings (DDIM, classifier-free guidance).

        Called from a callback, outside Lightning's autocast, so it opens the same one itself: with the UNet
        held in bf16 that is bf16 autocast, which also lets joint-kv's fp32 K/V weights take bf16 inputs."""
        sd = self.sd
        was_training = sd.text_encoder.training
        sd.text_encoder.eval()
        amp = sd.unet.dtype if sd.unet.dtype != torch.float32 else None
        try:
            with autocast(self.device, amp):
                return self._sample(prompts, seed, steps, guidance, resolution)
        finally:
            sd.text_encoder.train(was_training)

    def _sample(self, prompts: list[str], seed: int, steps: int, guidance: float, resolution: int) -> torch.Tensor:
        sd = self.sd
        texts = [expand_prompt(p, self.num_vectors) for p in prompts]
        cond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, texts, self.device).to(sd.unet.dtype)
        uncond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [""] * len(texts), self.device).to(sd.unet.dtype)
        f = sd.vae_scale_factor
        lat = sdlib.initial_latents([seed + i for i in range(len(texts))], (sd.unet.config.in_channels,
                                    resolution // f, resolution // f), self.device, sd.unet.dtype)
        sched = sdlib.make_ddim_scheduler(sd.noise_scheduler)
        lat = sdlib.sample_latents(sd.unet, sched, lat, cond, uncond, steps=steps, guidance=guidance)
        return sdlib.decode_latents(sd.vae, lat)


class ExportEmbeddings(Callback):
    """Write the learned embeddings (and K/V weights) every `every` steps and at the end; optional samples."""

    def __init__(self, out: Path, run_dir: Path, info: dict, every: int, sample_every: int = 0,
                 sample_prompts: list[str] | None = None, sample_steps: int = 25, resolution: int = 512, seed: int = 0):
        self.out, self.run_dir, self.info, self.every = out, run_dir, info, every
        self.sample_every, self.sample_prompts, self.sample_steps = sample_every, sample_prompts or [], sample_steps
        self.resolution, self.seed = resolution, seed

    def export(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        info = dict(self.info, steps=trainer.global_step)
        for token, vec in module.learned().items():
            save_embedding(self.out / f"{token_file_stem(token)}.safetensors", token, vec, info)
        if len(module.kv):
            save_kv(self.out / KV_FILE, module.sd.unet, dict(info, tokens=list(module.num_vectors)))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0:
            self.export(trainer, module)
        if self.sample_every and step % self.sample_every == 0 and trainer.is_global_zero and self.sample_prompts:
            from common.images import save_grid, to_uint8
            imgs = module.sample(self.sample_prompts, self.seed, self.sample_steps, resolution=self.resolution)
            save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", to_uint8(imgs), 1, len(imgs))

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module)


# ------------------------------------------------------------------------------------------------------ cli

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt / .safetensors or a diffusers folder")
    p.add_argument("--images", action="append", required=True, help="folder of the concept's photos (repeat per concept)")
    p.add_argument("--token", action="append", required=True, help="the new token, e.g. '<new1>' (repeat per concept)")
    p.add_argument("--init-word", action="append", required=True,
                   help="word whose embedding the token starts from, e.g. dog (repeat per concept)")
    p.add_argument("--property", action="append", choices=tuple(TEMPLATES), default=None,
                   help="caption templates: object (default) or style (repeat per concept)")
    p.add_argument("--vectors", type=int, default=1, help="embedding vectors per token (multi-vector tokens)")
    p.add_argument("--method", choices=METHODS, default="ti",
                   help="ti: only the token vectors learn; joint-kv: also the UNet's cross-attention K/V, shared "
                        "by the concepts (Custom Diffusion's multi-concept recipe, designed for prompts that "
                        "combine several concepts; not measured against ti here)")
    p.add_argument("--out", required=True, help="folder for the learned embeddings (what hw2_ti.sh reads)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time (resume continues)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512, help="training image side (a multiple of 8)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the token vectors")
    p.add_argument("--kv-lr", type=float, default=1e-5, help="learning rate of the K/V weights (joint-kv)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay of the token vectors")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--flip-p", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute UNet/text-encoder activations in the backward pass (default: on with CUDA)")
    p.add_argument("--save-every", type=int, default=500, help="export embeddings and a resumable checkpoint every N steps")
    p.add_argument("--sample-every", type=int, default=0, help="write sample images every N steps (0: never)")
    p.add_argument("--sample-prompt", action="append", default=None,
                   help="prompt for the samples (default: one caption per concept)")
    p.add_argument("--sample-steps", type=int, default=25)
    add_trainer_flags(p, "auto: bf16 mixed (frozen UNet/VAE in bf16) on GPU, fp32 on CPU",
                      resume_help="<out>/runs/<run>/last.ckpt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def concepts_from_args(args) -> list[dict]:
    n = len(args.images)
    props = args.property or ["object"] * n
    if not (len(args.token) == len(args.init_word) == n == len(props)):
        raise UserError(f"give --images, --token, --init-word (and --property, if any) once per concept: got "
                        f"{n} --images, {len(args.token)} --token, {len(args.init_word)} --init-word, {len(props)} --property")
    if len(set(args.token)) != n:
        raise UserError(f"--token: the same token twice ({args.token})")
    out = []
    for images, token, word, prop in zip(args.images, args.token, args.init_word, props):
        if not TOKEN_RE.fullmatch(token):
            raise UserError(f"--token {token!r}: write it as <name> with no spaces (e.g. <new1>)")
        token_file_stem(token)
        list_concept_images(images)
        out.append({"images": str(images), "token": token, "init_word": word, "property": prop,
                    "vectors": args.vectors})
    return out


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "vectors", "save_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.resolution < 8 or args.resolution % 8:
        raise UserError("--resolution must be a positive multiple of 8")
    concepts = concepts_from_args(args)
    out = check_writable(args.out)
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu: CUDA is not available on this machine")
    precision = lightning_precision(accelerator, args.precision)
    ckpt_grad = args.gradient_checkpointing if args.gradient_checkpointing is not None else accelerator == "gpu"
    run_name = "_".join(token_file_stem(c["token"]) for c in concepts) + ("_joint-kv" if args.method == "joint-kv" else "")
    run_dir = out / "runs" / run_name
    resume = resolve_resume(args.resume, run_dir)
    seed_everything(args.seed)
    setup_cuda_fast_math()

    data = ConceptDataModule(concepts, args.resolution, args.batch_size, args.seed, args.num_workers, args.flip_p,
                             args.steps)
    data.setup()  # decode every photo now: a bad file fails before anything is written
    module = TextualInversionModule(args.sd, concepts, args.method, args.lr, args.kv_lr, args.weight_decay,
                                    args.warmup_steps, ckpt_grad, "bf16" if precision == "bf16-mixed" else "fp32", args.seed)
    ensure_dir(run_dir)
    info = {"method": args.method, "sd": str(args.sd), "concepts": concepts, "resolution": args.resolution,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "precision": precision.split("-")[0]}
    prompts = args.sample_prompt or [TEMPLATES[c["property"]][0].format(c["token"]) for c in concepts]
    export = ExportEmbeddings(out, run_dir, info, args.save_every, args.sample_every, prompts, args.sample_steps,
                              args.resolution, args.seed)
    ckpt = last_checkpoint_callback(run_dir, args.save_every)
    devices, strategy = devices_and_strategy(args.devices)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
        max_steps=args.steps, max_time={"minutes": args.max_minutes} if args.max_minutes else None,
        logger=CSVLogger(run_dir, name="logs"), log_every_n_steps=min(25, args.steps), callbacks=[ckpt, export],
        plugins=[AtomicCheckpointIO()], enable_model_summary=False, enable_progress_bar=not args.quiet,
        default_root_dir=run_dir, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    files = [out / f"{token_file_stem(c['token'])}.safetensors" for c in concepts]
    if args.method == "joint-kv":
        files.append(out / KV_FILE)
    if trainer.is_global_zero:
        print(f"done after {trainer.global_step} steps: " + ", ".join(str(f) for f in files))
    return {"steps": trainer.global_step, "files": [str(f) for f in files], "module": module}


if __name__ == "__main__":
    main()
