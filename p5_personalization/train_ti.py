#!/usr/bin/env python
"""Textual inversion on a frozen Stable Diffusion v1.x: learn a new token from a handful of photos.

    python p5_personalization/train_ti.py --sd sd-v1-4.ckpt --images hw2_data/textual_inversion/0 \\
        --token "<new1>" --init-word dog --vectors 1 --steps 3000 --out checkpoints/textual_inversion
    python p5_personalization/train_ti.py --sd sd-v1-4.ckpt --images ".../1" --token "<new2>" \\
        --init-word painting --property style --out checkpoints/textual_inversion

Only the new token's vectors learn; the UNet, VAE, text encoder and every other embedding row stay
bit-identical. Each step: an augmented photo (random crop and scale, horizontal flip), a caption from
the object or style templates with the token in it ("a photo of a <new1>", "a painting in the style
of <new2>"), or with --captions the photo's own caption ("a <new1> circle with navy background", for a
model that only knows its own prompt language, such as the mini SD), the usual noise-prediction loss of the
frozen UNet; the gradient reaches the token through the text encoder. SD is loaded offline as P3 does
(common.stable_diffusion; --sd is sd-v1-4.ckpt, a .safetensors or a diffusers folder).

Several concepts at once: repeat --images/--token/--init-word (and --property, --captions) once per concept. With
--method ti they are independent embeddings trained side by side; with --method joint-kv the
cross-attention key and value projections of the UNet are fine-tuned too, shared by the concepts (the
multi-concept recipe of Custom Diffusion, Kumari et al. 2023, meant to help several concepts appear
together in one prompt). That paper also trains on captioned real images without the token, so that the
K/V change attaches to the token instead of to every prompt: --prior-images/--prior-captions (a share
--prior-share of the images). The two methods are compared on the mini SD in BENCHMARKS.md; on SD v1.4 no
comparison has been run here: score both with scripts/evaluate_ti.py to see which composes better.

Writes to --out (the folder hw2_ti.sh reads):
  <token name>.safetensors / .json   the learned vectors in diffusers' textual-inversion format (+ how)
  cross_attn_kv.safetensors / .json  with --method joint-kv: the fine-tuned UNet K/V weights
  runs/<run>/last.ckpt               Lightning state for --resume (only the trained tensors + optimiser)
  runs/<run>/samples/step_XXXXXX.png with --sample-every: images from --sample-prompt
On CUDA (GPUs from Ampere on; older ones run fp32): bf16 autocast with the frozen UNet and VAE held in bf16,
SDPA attention; --gradient-checkpointing
trades compute for memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

import common.stable_diffusion as sdlib
from common.checkpoint import check_resume_fits, note_if_finished, read_resume_checkpoint
from common.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    OPEN_SHARE,
    SHARE,
    UP_TO_1,
    HelpFormatter,
    add_config_flags,
    config_from_args,
    explicit_flags,
    resume_refusal,
    resumed_args,
    resumed_config,
)
from common.datasets import IMAGE_SUFFIXES, list_images, to_8_bit, upright
from common.device import autocast, lightning_precision, setup_cuda_fast_math
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir
from common.lightning_utils import (
    adamw_with_schedule,
    add_trainer_flags,
    make_trainer,
    resolve_accelerator,
    resolve_num_workers,
    resolve_resume,
)
from common.schedules import training_target
from common.seeding import sample_seed, seed_everything
from common.step_batches import SequentialStream, step_batch_loader
from p5_personalization.concepts import TOKEN_RE, token_file_stem
from p5_personalization.textual_inversion import (
    KV_FILE,
    add_tokens,
    check_new_token,
    cross_attention_kv_names,
    expand_prompt,
    init_vectors,
    save_embedding,
    save_kv,
)

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
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
METHODS = ("ti", "joint-kv")


@dataclass(frozen=True)
class P5TrainConfig:
    """Every hyper-parameter of a P5 training run: the flags of this script, saved in last.ckpt and recorded
    (as "train") in the JSON beside each exported embedding."""

    method: str = field(default="ti", metadata={
        "choices": METHODS,
        "help": "ti: only the token vectors learn; joint-kv: also the UNet's cross-attention K/V, shared by the "
                "concepts (Custom Diffusion's multi-concept recipe, designed for prompts that combine several "
                "concepts; measured against ti on the mini SD in BENCHMARKS.md)"})
    vectors: int = field(default=1, metadata={
        "range": AT_LEAST_1, "help": "embedding vectors per token (multi-vector tokens)"})
    steps: int = field(default=3000, metadata={"range": AT_LEAST_1, "aliases": ("--max-steps",),
                                               "help": "optimiser steps"})
    batch_size: int = field(default=4, metadata={"range": AT_LEAST_1, "help": "images per step (per device)"})
    resolution: int | None = field(default=None, metadata={"aliases": ("--size",),
        "help": "training image side, a multiple of 8 (default: the SD's native resolution: 512 for SD v1.4, "
                "64 for the mini SD)"})
    lr: float = field(default=5e-3, metadata={
        "range": NON_NEGATIVE, "help": "learning rate of the token vectors"})
    kv_lr: float = field(default=1e-5, metadata={
        "range": NON_NEGATIVE, "help": "learning rate of the K/V weights (joint-kv)"})
    weight_decay: float = field(default=1e-2, metadata={
        "range": NON_NEGATIVE, "help": "AdamW weight decay of the token vectors"})
    warmup_steps: int = field(default=0, metadata={
        "range": NON_NEGATIVE, "help": "linear warm-up of the learning rates over these steps"})
    flip_p: float = field(default=0.5, metadata={"range": SHARE, "help": "probability of a horizontal flip"})
    crop_min_scale: float = field(default=0.6, metadata={
        "range": UP_TO_1,
        "help": "smallest random square crop, as a share of the photo's shorter side (1: the whole photo)"})
    prior_share: float = field(default=0.5, metadata={
        "range": OPEN_SHARE,
        "help": "with --prior-images: the share of the training images drawn from them (every k-th image of "
                "the stream, the same whatever the batch size)"})
    # None: on with CUDA. Its flag is written by hand (build_parser): the generated help would call None "off"
    gradient_checkpointing: bool | None = field(default=None, metadata={"flag": False})
    save_every: int = field(default=500, metadata={
        "range": AT_LEAST_1, "help": "export embeddings and a resumable checkpoint every N steps"})
    sample_every: int = field(default=0, metadata={
        "range": NON_NEGATIVE, "help": "write sample images every N steps (0: never)"})
    sample_steps: int = field(default=25, metadata={"range": AT_LEAST_1, "help": "DDIM steps of the sample images"})
    sample_guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance of the sample images"})


# ----------------------------------------------------------------------------------------------------- data

def list_concept_images(folder: str) -> list[Path]:
    return list_images(folder, not_found="--images folder not found",
                       empty=f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the --images folder")


def list_prior_images(folder: str) -> list[Path]:
    return list_images(folder, not_found="--prior-images folder not found",
                       empty="no images in the --prior-images folder")


def read_captions(path: str, images: list[Path], flag: str = "--captions") -> dict[str, tuple[str, ...]]:
    """--captions: a JSON object mapping each photo's file name to its caption, or a list of captions, with
    `{}` where the token goes (DreamBooth-style per-image captions). Every photo of the folder needs one.
    --prior-captions: the same without the token, so no `{}`."""
    from common.fileio import read_json
    token = flag == "--captions"
    raw = read_json(path, f"{flag} file")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {flag} must be a JSON object mapping image file names to captions")
    names = {f.name for f in images}
    unknown = sorted(set(raw) - names)
    if unknown:
        folder = "--images" if token else "--prior-images"
        raise UserError(f"{path}: captions for images that are not in the {folder} folder: {', '.join(unknown[:5])}")
    missing = sorted(names - set(raw))
    if missing:
        raise UserError(f"{path}: no caption for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    out = {}
    for name, caps in raw.items():
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and ("{}" in c) == token for c in caps):
            raise UserError(f"{path}: the caption(s) of {name!r} must be strings " + (
                "with {} where the token goes" if token else "without {} (prior images have no token)"))
        out[name] = tuple(caps)
    return out


class ConceptImages(torch.utils.data.Dataset):
    """An endless, seeded stream of augmented concept photos with captions: item `pos` of the stream.

    The photos (of all concepts) are visited in a fresh seeded order every round; the crop, flip and
    caption of item `pos` come from a generator seeded by (seed, pos). So the stream is a pure function of
    the seed, and a run resumed at step s reads exactly what an uninterrupted run would have. A concept's
    captions are its "captions" file's (read_captions), one of the photo's own, else the templates of its
    "property". With `prior` ({"images": folder, "captions": file}) a share `prior_share` of the stream,
    evenly spread, comes from those captioned images instead, in their own seeded order.
    """

    def __init__(self, concepts: list[dict], resolution: int, seed: int = 0, flip_p: float = 0.5,
                 min_scale: float = 0.6, length: int = 10 ** 9, prior: dict | None = None,
                 prior_share: float = 0.0):
        self.resolution, self.seed, self.flip_p, self.min_scale, self.length = (
            resolution,
            seed,
            flip_p,
            min_scale,
            length,
        )
        self.items = []  # (token, photo, its captions)
        for c in concepts:
            files = list_concept_images(c["images"])
            captions = read_captions(c["captions"], files) if c.get("captions") else {}
            self.items += [(c["token"], im, captions.get(f.name, TEMPLATES[c["property"]]))
                           for f, im in zip(files, self._decode(files))]
        self.prior_items, self.prior_share = [], prior_share if prior else 0.0
        if prior:
            files = list_prior_images(prior["images"])
            captions = read_captions(prior["captions"], files, flag="--prior-captions")
            self.prior_items = [(None, im, captions[f.name]) for f, im in zip(files, self._decode(files))]
        self._orders: dict[tuple[str, int], list[int]] = {}

    def _decode(self, files: list[Path]) -> list:
        from PIL import Image, UnidentifiedImageError
        out = []
        for f in files:
            try:
                with Image.open(f) as im:
                    im = to_8_bit(upright(im)).convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"{f}: not a readable image ({e})") from None
            # keep a copy a little larger than the crops, so each step's resize is cheap
            scale = 1.25 * self.resolution / min(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            out.append(im)
        return out

    def __len__(self) -> int:
        return self.length

    def _order(self, kind: str, round_: int, n: int) -> list[int]:
        if (kind, round_) not in self._orders:
            order = list(range(n))
            # the concept photos keep the key they always had: runs without prior images are unchanged
            random.Random(f"{self.seed}/order/{round_}" if kind == "concept" else
                          f"{self.seed}/{kind}/{round_}").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != kind}
            self._orders[(kind, round_)] = order
        return self._orders[(kind, round_)]

    def _pick(self, pos: int) -> tuple:
        """Stream item pos: the n-th prior image when a prior image falls there (every 1/prior_share-th
        item, spread evenly), else the next concept photo."""
        s = self.prior_share
        priors_before = int(pos * s)
        if s and int((pos + 1) * s) > priors_before:
            kind, items, n = "prior", self.prior_items, priors_before
        else:
            kind, items, n = "concept", self.items, pos - priors_before
        round_, k = divmod(n, len(items))
        return items[self._order(kind, round_, len(items))[k]]

    def __getitem__(self, pos: int) -> dict:
        import torchvision.transforms.functional as TF
        token, im, captions = self._pick(pos)
        g = random.Random(f"{self.seed}/item/{pos}")
        # random square crop covering min_scale..1 of the shorter side, resized to the training resolution
        crop = max(1, int(min(im.size) * g.uniform(self.min_scale, 1.0)))
        left, top = g.randint(0, im.width - crop), g.randint(0, im.height - crop)
        im = im.crop((left, top, left + crop, top + crop)).resize((self.resolution, self.resolution), 3)
        if g.random() < self.flip_p:
            im = TF.hflip(im)
        x = TF.to_tensor(im) * 2 - 1
        caption = g.choice(captions)
        return {"pixel_values": x, "prompt": caption if token is None else caption.replace("{}", token)}


class ConceptDataModule(pl.LightningDataModule):
    def __init__(self, *, concepts: list[dict], resolution: int, batch_size: int, seed: int, flip_p: float,
                 steps: int, num_workers: int = 0, min_scale: float = 0.6, prior: dict | None = None,
                 prior_share: float = 0.0):
        super().__init__()
        self.concepts, self.resolution, self.batch_size = concepts, resolution, batch_size
        self.seed, self.num_workers, self.flip_p, self.steps = seed, num_workers, flip_p, steps
        self.min_scale, self.prior, self.prior_share = min_scale, prior, prior_share
        self.dataset = None

    def setup(self, stage=None):
        if self.dataset is None:
            self.dataset = ConceptImages(self.concepts, self.resolution, self.seed, self.flip_p, self.min_scale,
                                         length=self.steps * self.batch_size, prior=self.prior,
                                         prior_share=self.prior_share)

    def train_dataloader(self):
        # batch b of the run (rank r of R: stream batch b * R + r) holds stream items from b * batch_size on; the
        # loader starts at the step Lightning restored and spans the whole run (common.step_batches)
        return step_batch_loader(self.trainer, SequentialStream(self.dataset, self.batch_size), self.num_workers)


# ---------------------------------------------------------------------------------------------------- model

def enable_activation_checkpointing(model) -> None:
    """Activation checkpointing of a transformers model, non-reentrant: newer 5.x releases call it
    activation_checkpointing_enable (the old name warns that it goes in v6); older 5.x releases (5.17, for one)
    have only gradient_checkpointing_enable. A GPU box set up before requirements.txt may hold either."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


class TextualInversionModule(pl.LightningModule):
    """Frozen SD + trainable token vectors (+ the cross-attention K/V with method 'joint-kv').

    The SD components live outside the module tree (`self.sd`), so Lightning checkpoints hold only what
    is trained; `self.token_vectors` is the same Parameter the text encoder's NewTokenEmbedding uses.
    components: SD already loaded (tests, benchmarks), instead of loading `sd_path`; frozen_dtype: "fp32" or
    "bf16", what the frozen UNet and VAE are held in; seed: of each step's noise and timesteps.
    """

    def __init__(self, *, sd_path: str, concepts: list[dict], config: P5TrainConfig | None = None,
                 frozen_dtype: str = "fp32", seed: int = 0, components=None, prior: dict | None = None):
        super().__init__()
        self.config = config = config if config is not None else P5TrainConfig()
        # the config as a plain dict, not the dataclass: checkpoints then load without this module's classes
        # prior: the --prior-images/--prior-captions of the run, which --resume checks
        self.save_hyperparameters({"sd_path": sd_path, "concepts": concepts, "train": dataclasses.asdict(config),
                                   "frozen_dtype": frozen_dtype, "seed": seed, "prior": prior})
        method = config.method
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
        if config.gradient_checkpointing:
            sd.unet.enable_gradient_checkpointing()
            # transformers checkpoints only in train mode; CLIP's text encoder has no dropout, so train mode
            # changes nothing else
            enable_activation_checkpointing(te)
            te.train()
        self.sd = sd
        self.prediction = sd.prediction  # what the loss's target is: eps for SD v1 (its scheduler says)
        # on the module's device once, not copied there every step (the v target reads it)
        self.register_buffer("alphas_cumprod", sd.noise_scheduler.alphas_cumprod.float().clone(), persistent=False)

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
        ab = self.alphas_cumprod[t][:, None, None, None]
        return F.mse_loss(pred.float(), training_target(latents, noise, ab, self.prediction))

    def training_step(self, batch, batch_idx):
        # the step's noise, timesteps and latent sample depend on (seed, step) only: resumed runs match
        g = torch.Generator(self.device).manual_seed(sample_seed(self.hparams.seed, self.global_step))
        loss = self.diffusion_loss(batch["pixel_values"], batch["prompt"], generator=g)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["prompt"]))
        return loss

    def configure_optimizers(self):
        c = self.config
        groups = [{"params": [self.token_vectors], "lr": c.lr, "weight_decay": c.weight_decay}]
        if len(self.kv):
            groups.append({"params": list(self.kv.values()), "lr": c.kv_lr, "weight_decay": 0.0})
        # each group carries its own rate and decay; the schedule scales both
        return adamw_with_schedule(groups, lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps)

    def learned(self) -> dict[str, torch.Tensor]:
        """token -> (N, D) current vectors (fp32, CPU)."""
        v = self.token_vectors.detach().float().cpu()
        out, start = {}, 0
        for token, n in self.num_vectors.items():
            out[token] = v[start:start + n].clone()
            start += n
        return out

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, *, steps: int, guidance: float, resolution: int):
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
                                    resolution // f, resolution // f), self.device)  # fp32, as infer_ti's
        sched = sdlib.make_ddim_scheduler(sd.noise_scheduler)
        lat = sdlib.sample_latents(sd.unet, sched, lat, cond, uncond, steps=steps, guidance=guidance)
        return sdlib.decode_latents(sd.vae, lat)


class ExportEmbeddings(Callback):
    """Write the learned embeddings (and K/V weights) to `out` every `every` steps and at the end; every
    `sample_every` steps (0: never) a grid of `sample_prompts` into <run_dir>/samples/."""

    def __init__(self, *, out: Path, run_dir: Path, info: dict, every: int, sample_every: int,
                 sample_prompts: list[str], sample_steps: int, sample_guidance: float, resolution: int, seed: int):
        self.out, self.run_dir, self.info, self.every = out, run_dir, info, every
        self.sample_every, self.sample_prompts, self.sample_steps = sample_every, sample_prompts, sample_steps
        self.sample_guidance, self.resolution, self.seed = sample_guidance, resolution, seed

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
            imgs = module.sample(self.sample_prompts, self.seed, steps=self.sample_steps,
                                 guidance=self.sample_guidance, resolution=self.resolution)
            save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", to_uint8(imgs), 1, len(imgs))

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module)


# ------------------------------------------------------------------------------------------------------ cli

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt / .safetensors or a diffusers folder"
    )
    p.add_argument(
        "--images", action="append", required=True, help="folder of the concept's photos (repeat per concept)"
    )
    p.add_argument("--token", action="append", required=True, help="the new token, e.g. '<new1>' (repeat per concept)")
    p.add_argument("--init-word", action="append", required=True,
                   help="word whose embedding the token starts from, e.g. dog (repeat per concept)")
    p.add_argument("--property", action="append", choices=tuple(TEMPLATES), default=None,
                   help="caption templates: object (default) or style (repeat per concept)")
    p.add_argument("--captions", action="append", default=None,
                   help="per-image captions instead of the templates: a JSON object mapping each photo's file name "
                        "to a caption (or a list) with {} for the token, e.g. {\"1.png\": \"a {} circle with navy "
                        "background\"} (repeat per concept; 'none' keeps a concept's templates)")
    p.add_argument("--prior-images", default=None,
                   help="regularisation images without the token (Custom Diffusion's real images, DreamBooth's "
                        "prior preservation): a share --prior-share of each run's images comes from them, so what "
                        "is learned (above all joint-kv's K/V) stays with the token instead of changing every prompt")
    p.add_argument("--prior-captions", default=None,
                   help="with --prior-images: a JSON object mapping each of its file names to a caption (or a "
                        "list), without {}")
    p.add_argument("--out", required=True, help="folder for the learned embeddings (what hw2_ti.sh reads)")
    p.add_argument("--sample-prompt", action="append", default=None,
                   help="prompt for the samples (default: one caption per concept)")
    g = p.add_argument_group("hyper-parameters")
    add_config_flags(g, P5TrainConfig())
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute UNet/text-encoder activations in the backward pass (default: on with CUDA, "
                        "off on the CPU)")
    add_trainer_flags(p, "auto: bf16 mixed (frozen UNet/VAE in bf16) on GPUs from Ampere on, else fp32",
                      resume_help="<out>/runs/<run>/last.ckpt", resume_may_change=RESUME_MAY_CHANGE)
    return p


PROGRAM = "p5_personalization/train_ti.py"
# what a --resume may change: how long the run goes on, how it exports and samples, and activation
# checkpointing (memory, not results)
RESUME_MAY_CHANGE = ("steps", "save_every", "sample_every", "sample_steps", "sample_guidance",
                     "gradient_checkpointing")


def same_concepts(concepts: list[dict]) -> list[dict]:
    """Concepts as --resume compares them: their folders and caption files resolved (a run resumed from
    another working directory names the same photos)."""
    return [{k: str(Path(v).resolve()) if k in ("images", "captions") else v for k, v in c.items()}
            for c in concepts]


def concepts_from_args(args, vectors: int) -> list[dict]:
    n = len(args.images)
    props = args.property or ["object"] * n
    captions = args.captions or ["none"] * n
    if not (len(args.token) == len(args.init_word) == n == len(props) == len(captions)):
        raise UserError(
            f"give --images, --token, --init-word (and --property, --captions, if any) once per concept: got "
            f"{n} --images, {len(args.token)} --token, {len(args.init_word)} --init-word, {len(props)} --property, "
            f"{len(captions)} --captions"
        )
    if len(set(args.token)) != n:
        raise UserError(f"--token: the same token twice ({args.token})")
    out = []
    for images, token, word, prop, caps in zip(args.images, args.token, args.init_word, props, captions):
        if not TOKEN_RE.fullmatch(token):
            raise UserError(f"--token {token!r}: write it as <name> with no spaces (e.g. <new1>)")
        token_file_stem(token)
        files = list_concept_images(images)
        # paths recorded resolved: the exported JSON then names the photos whatever the working directory
        concept = {"images": str(Path(images).resolve()), "token": token, "init_word": word, "property": prop,
                   "vectors": vectors}
        if caps != "none":
            read_captions(caps, files)
            concept["captions"] = str(Path(caps).resolve())
        out.append(concept)
    return out


def prior_from_args(args) -> dict | None:
    """--prior-images/--prior-captions as {"images", "captions"}, checked; None without them."""
    if (args.prior_images is None) != (args.prior_captions is None):
        raise UserError("give --prior-images and --prior-captions together")
    if args.prior_images is None:
        return None
    files = list_prior_images(args.prior_images)
    read_captions(args.prior_captions, files, flag="--prior-captions")
    return {"images": str(Path(args.prior_images).resolve()), "captions": str(Path(args.prior_captions).resolve())}


def first_caption(concept: dict) -> str:
    """The default sample prompt of a concept: its first photo's first caption, else its first template."""
    if concept.get("captions"):
        files = list_concept_images(concept["images"])
        caption = read_captions(concept["captions"], files)[files[0].name][0]
    else:
        caption = TEMPLATES[concept["property"]][0]
    return caption.replace("{}", concept["token"])


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    given = explicit_flags(build_parser, argv)
    resolve_num_workers(args, decodes=False)  # the few photos are decoded once and held in memory
    config = config_from_args(P5TrainConfig(), args)
    if config.resolution is not None and (config.resolution < 8 or config.resolution % 8):
        raise UserError("--resolution must be a positive multiple of 8")
    concepts = concepts_from_args(args, config.vectors)
    prior = prior_from_args(args)
    out = check_writable(args.out)
    accelerator = resolve_accelerator(args.accelerator)
    precision = lightning_precision(accelerator, args.precision)
    if config.gradient_checkpointing is None:  # recorded as resolved, so the exported JSON says what ran
        config = dataclasses.replace(config, gradient_checkpointing=accelerator == "gpu")
    stem = "_".join(token_file_stem(c["token"]) for c in concepts)
    run_dir = out / "runs" / (stem + ("_joint-kv" if config.method == "joint-kv" else ""))
    if args.resume == "auto" and "method" not in given:
        # --method left off takes the checkpoint's too: find the run of these tokens, whichever method it used
        found = [d for d in (out / "runs" / stem, out / "runs" / f"{stem}_joint-kv") if (d / "last.ckpt").is_file()]
        if len(found) > 1:
            raise UserError(f"{out / 'runs'}: runs of both methods for {stem} ({found[0].name}, {found[1].name}); "
                            f"give --method to say which to resume")
        run_dir = found[0] if found else run_dir
    resume = resolve_resume(args.resume, run_dir)
    # read and checked now: a truncated or foreign --resume checkpoint fails before SD is loaded or anything written
    resume_ckpt = None
    if resume is not None:
        resume_ckpt = read_resume_checkpoint(resume, PROGRAM, ("concepts", "train"))
        hp = resume_ckpt["hyper_parameters"]
        config = resumed_config(config, hp["train"], given, may_change=RESUME_MAY_CHANGE, source=resume,
                                program=PROGRAM)
        resumed_args(args, {k: hp[k] for k in ("seed",) if k in hp}, given, source=resume)
        note_if_finished(resume, resume_ckpt, config.steps, "--steps")
        concepts = [{**c, "vectors": config.vectors} for c in concepts]  # --vectors may be the checkpoint's
        if same_concepts(concepts) != same_concepts(hp["concepts"]):
            raise resume_refusal(resume, f"on other concepts ({hp['concepts']})")
        if "prior" in hp:  # checkpoints from before the prior was saved do not say
            if "prior_images" not in given and "prior_captions" not in given:
                prior = hp["prior"]
            elif prior != hp["prior"]:
                raise resume_refusal(resume, f"with prior images {hp['prior']} (not {prior})")
    seed_everything(args.seed)
    setup_cuda_fast_math()
    if args.quiet:
        sdlib.quiet_libraries()

    components = None
    if config.resolution is None:  # resolved before the photos are sized, and recorded as resolved
        components = sdlib.load_sd(args.sd)
        config = dataclasses.replace(config, resolution=components.native_resolution)
    data = ConceptDataModule(concepts=concepts, resolution=config.resolution, batch_size=config.batch_size,
                             seed=args.seed, flip_p=config.flip_p, steps=config.steps, num_workers=args.num_workers,
                             min_scale=config.crop_min_scale, prior=prior, prior_share=config.prior_share)
    data.setup()  # decode every photo now: a bad file fails before anything is written
    module = TextualInversionModule(sd_path=args.sd, concepts=concepts, config=config,
                                    frozen_dtype="bf16" if precision == "bf16-mixed" else "fp32", seed=args.seed,
                                    components=components, prior=prior)
    if resume_ckpt is not None:  # a checkpoint of other settings fails here, not inside Lightning
        check_resume_fits(resume, resume_ckpt, module, PROGRAM)
        del resume_ckpt
    ensure_dir(run_dir)
    info = {"method": config.method, "sd": str(Path(args.sd).resolve()), "concepts": concepts, "prior": prior,
            "resolution": config.resolution,
            "batch_size": config.batch_size, "lr": config.lr, "seed": args.seed, "precision": precision.split("-")[0],
            "train": dataclasses.asdict(config)}
    prompts = args.sample_prompt or [first_caption(c) for c in concepts]
    export = ExportEmbeddings(out=out, run_dir=run_dir, info=info, every=config.save_every,
                              sample_every=config.sample_every, sample_prompts=prompts,
                              sample_steps=config.sample_steps, sample_guidance=config.sample_guidance,
                              resolution=config.resolution, seed=args.seed)
    trainer = make_trainer(args, out=run_dir, precision=precision, max_steps=config.steps,
                           checkpoint_every=config.save_every, callbacks=[export], val_every=None,
                           log_every_n_steps=min(25, config.steps))
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    files = [out / f"{token_file_stem(c['token'])}.safetensors" for c in concepts]
    if config.method == "joint-kv":
        files.append(out / KV_FILE)
    if trainer.is_global_zero:
        print(f"done after {trainer.global_step} steps: " + ", ".join(str(f) for f in files))
    return {"steps": trainer.global_step, "files": [str(f) for f in files], "module": module}


if __name__ == "__main__":
    main()
