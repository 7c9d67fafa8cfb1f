#!/usr/bin/env python
"""Generate face images from the course's noise files with DDIM and the course's pretrained UNet.

    python p2_ddim/infer.py --noise-dir hw2_data/face/noise --out OUT --unet hw2_data/face/UNet.pt
    bash hw2_2.sh hw2_data/face/noise OUT hw2_data/face/UNet.pt          # the same, as the course runs it

Every NAME.pt in --noise-dir (a (1,3,H,W) or (3,H,W) float tensor) becomes OUT/NAME.png, min-max
normalised on its own to 0-255, RGB. Defaults follow the convention of a public reproduction that reached
MSE 2.47 against the course's ground truth: linear betas 1e-4..0.02 (float64), 50 DDIM steps at
t = 980, 960, ..., 0, the model called with those t (--timestep-offset 1 calls it with t+1, as other
public solutions do), no clipping of the predicted x0, eta 0. All noises go through in batches; the
arithmetic is exact fp32 unless --precision bf16/auto or --tf32 is given. --precision defaults to fp32 here,
also on CUDA (where the other commands' auto means bf16): the hand-in is graded by its MSE against fixed
ground-truth images, so by default it is exact and the same on every device. With eta > 0 the fresh noise of
image NAME comes from --seed and NAME's number only (so it does not depend on --batch-size).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import HelpFormatter, float_in, int_at_least, int_in
from common.ddim import sample_ddim
from common.device import (
    add_device_flag,
    add_precision_flag,
    autocast,
    autocast_dtype,
    channels_last_pays,
    pick_device,
    set_tf32,
)
from common.errors import UserError, cli_main, one_line
from common.fileio import check_writable, folder_error, remove_stale_temps
from common.images import save_pngs, to_uint8
from common.schedules import alphas_cumprod, make_betas
from common.seeding import PerSampleNoise
from p2_ddim.model import FaceUNet, load_face_unet

DEFAULTS = dict(steps=50, eta=0.0, timestep_offset=0, seed=0, batch_size=10, num_train_steps=1000)


def face_alphas_cumprod() -> torch.Tensor:
    """The course's schedule: betas linspace(1e-4, 0.02, 1000), float64."""
    return alphas_cumprod(make_betas("linear", DEFAULTS["num_train_steps"], 1e-4, 0.02))


def _load_one_noise(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / EOF / unsupported-global errors all mean "not a tensor file"
        raise UserError(f"{path}: not a readable torch tensor file: {one_line(e)}") from None
    if not torch.is_tensor(obj):
        raise UserError(f"{path}: expected a tensor, found a {type(obj).__name__}")
    if not obj.is_floating_point():
        raise UserError(f"{path}: expected a float tensor, found dtype {obj.dtype}")
    found = tuple(obj.shape)
    if obj.dim() == 4 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 3 or obj.shape[0] != 3:
        raise UserError(f"{path}: expected a noise of shape (1,3,H,W) or (3,H,W), found {found}")
    if not torch.isfinite(obj).all():
        raise UserError(f"{path}: the noise contains NaN or infinity")
    return obj.to(torch.float32)


def noise_indices(stems: list[str]) -> list[int]:
    """The per-sample noise key of each file: its number (00.pt -> 0) when all names are numbers, else its position."""
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(stems)))


def load_noises(
    noise_dir: str | os.PathLike, only: list[str] | None = None
) -> tuple[list[str], torch.Tensor, list[int]]:
    """(stems, (N,3,H,W) float32 noises, per-sample noise keys) of the *.pt files in a folder, sorted by name.

    `only` picks files by stem (e.g. ['00', '01']), in that order.
    """
    d = Path(noise_dir)
    if not d.is_dir():
        raise folder_error(d, "noise folder not found (expected the course's hw2_data/face/noise)")
    # the suffix in any case, as the image listers take .PNG: a NAME.PT saved on Windows was skipped without a word
    files = sorted(p for p in d.iterdir()
                   if p.suffix.lower() == ".pt" and not p.name.startswith(".") and p.is_file())
    if not files:
        raise UserError(f"{d}: no .pt noise files in this folder")
    by_stem = {}
    for p in files:
        if p.stem in by_stem:  # 00.pt and 00.PT would both become 00.png
            raise UserError(f"{p}: {by_stem[p.stem].name} is there too; both would be written as {p.stem}.png")
        by_stem[p.stem] = p
    all_stems = [p.stem for p in files]
    keys = dict(zip(all_stems, noise_indices(all_stems)))
    if only is not None:
        missing = [s for s in only if s not in keys]
        if missing:
            raise UserError(f"{d}: no noise file {missing[0]}.pt (found {', '.join(all_stems[:6])}"
                            f"{', ...' if len(all_stems) > 6 else ''})")
        files = [by_stem[s] for s in only]
    tensors, shape = [], None
    for p in files:
        x = _load_one_noise(p)
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise UserError(f"{p}: noise of shape {tuple(x.shape)} differs from {files[0].name}'s {tuple(shape)}")
        tensors.append(x)
    stems = [p.stem for p in files]
    if shape[1] % 32 or shape[2] % 32 or not shape[1] or not shape[2]:
        raise UserError(f"{files[0]}: noise size {shape[1]}x{shape[2]} is not a positive multiple of 32 "
                        "(the UNet halves it five times)")
    return stems, torch.stack(tensors), [keys[s] for s in stems]


def sample_faces_ddim(model: FaceUNet, noises: torch.Tensor, indices: list[int], steps: int = DEFAULTS["steps"],
                      eta: float = DEFAULTS["eta"], seed: int = DEFAULTS["seed"],
                      timestep_offset: int = DEFAULTS["timestep_offset"], clip_x0: float | None = None,
                      batch_size: int = DEFAULTS["batch_size"], device: torch.device | str = "cpu",
                      amp_dtype: torch.dtype | None = None, progress: bool = False,
                      desc: str = "DDIM") -> torch.Tensor:
    """P2: DDIM with the face UNet from each given noise x_T to x_0, in batches; returns the (N,3,H,W)
    float32 images on the CPU (unnormalised).

    The DDIM arithmetic is fp32 whatever `amp_dtype` is; autocast only wraps the UNet's forward.
    """
    device = torch.device(device)
    ab = face_alphas_cumprod()
    n = noises.shape[0]
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    out = []
    bar = tqdm(total=len(batches) * steps, desc=desc, unit="step", disable=not progress)

    def eps_fn(x, t):
        with autocast(device, amp_dtype):
            return model(x, t).float()

    try:
        for rows in batches:
            x = noises[rows].to(device=device, dtype=torch.float32)
            if channels_last_pays(device):
                x = x.contiguous(memory_format=torch.channels_last)
            src = PerSampleNoise(seed, [indices[i] for i in rows], device) if eta > 0 else None
            x0 = sample_ddim(eps_fn, x, ab, num_steps=steps, eta=eta, noise=src, clip_x0=clip_x0,
                             timestep_offset=timestep_offset, callback=lambda *a: bar.update(1))
            out.append(x0.float().cpu())
    finally:
        bar.close()
    images = torch.cat(out)
    if not torch.isfinite(images).all():
        raise UserError("sampling produced NaN or infinity (try --precision fp32 or check the weights)")
    return images


def add_sampling_args(p: argparse.ArgumentParser, fresh_noise: bool = True) -> None:
    """Flags shared by infer.py and experiments.py; fresh_noise=False: no --seed (a command that samples at
    eta 0 only draws no fresh noise, so a --seed would do nothing)."""
    p.add_argument("--steps", type=int_in(1, DEFAULTS["num_train_steps"]), default=DEFAULTS["steps"],
                   help="DDIM steps (uniform from T=1000)")
    p.add_argument("--timestep-offset", type=int, default=DEFAULTS["timestep_offset"], choices=(0, 1),
                   help="call the model with t + offset (0: t = 980..0, as the MSE-2.47 reproduction; 1: t+1)")
    p.add_argument("--clip-x0", type=float_in(0, low_open=True), nargs="?", const=1.0, default=None, metavar="C",
                   help="clamp the predicted x0 to [-C, C] (C = 1 when given alone; off by default)")
    if fresh_noise:
        p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the fresh noise when eta > 0")
    p.add_argument("--batch-size", type=int_at_least(1), default=DEFAULTS["batch_size"], help="noises per forward pass")
    add_device_flag(p)
    # fp32 by default even on CUDA: the hand-in is graded by MSE against fixed images (see the module docstring)
    add_precision_flag(p, default="fp32", what="the UNet (the DDIM arithmetic stays fp32)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA (faster, inexact)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def setup(args) -> tuple[torch.device, torch.dtype | None]:
    device = pick_device(args.device)
    amp = autocast_dtype(device, args.precision)
    set_tf32(args.tf32)  # after autocast_dtype: --tf32 is the last word on TF32
    return device, amp


def load_model(path, device: torch.device) -> FaceUNet:
    model = load_face_unet(path, device)
    if channels_last_pays(device):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--noise-dir", required=True, help="folder of NAME.pt noise tensors (hw2_data/face/noise)")
    p.add_argument("--out", required=True, help="output folder (created if missing); NAME.pt -> NAME.png")
    p.add_argument("--unet", required=True, help="the course's UNet.pt (a torch state dict)")
    p.add_argument("--eta", type=float_in(0), default=DEFAULTS["eta"], help="DDIM eta (0 = deterministic)")
    add_sampling_args(p)
    return p


@cli_main(sigterm=True)
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    device, amp = setup(args)
    stems, noises, indices = load_noises(args.noise_dir)
    out = check_writable(args.out)  # fail before loading weights or sampling, creating nothing
    remove_stale_temps(out)  # what a killed earlier run left
    model = load_model(args.unet, device)
    images = sample_faces_ddim(model, noises, indices, steps=args.steps, eta=args.eta, seed=args.seed,
                               timestep_offset=args.timestep_offset, clip_x0=args.clip_x0,
                               batch_size=args.batch_size, device=device, amp_dtype=amp, progress=not args.quiet)
    save_pngs(out, [f"{s}.png" for s in stems], to_uint8(images, "minmax"))  # all or nothing
    print(f"wrote {len(stems)} images to {out} (DDIM {args.steps} steps, eta {args.eta:g}, "
          f"offset {args.timestep_offset}, {args.precision}{' +tf32' if args.tf32 else ''}, {device}) "
          f"in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
