#!/usr/bin/env python
"""Report figures for problem 1.

    python p1_ddpm/report.py --out figs/

Writes
  figs/grid_mnistm.png, figs/grid_svhn.png  10x10: rows digits 0-9, columns different noise
  figs/reverse_process.png                  the first "0" and first "1" (MNIST-M) at six timesteps of
                                            the ancestral DDPM chain, t = 999, 800, 600, 400, 200, 0
The grids use the same sampler settings (and the same noise) as infer.py, so they show what
hw2_1.sh hands in.
"""
from __future__ import annotations

import argparse

import torch

from common.device import add_precision_flag, autocast_dtype, pick_device
from common.errors import cli_main
from common.fileio import check_writable
from common.images import save_grid, to_uint8
from common.seeding import PerSampleNoise
from p1_ddpm.data import DIGIT_DATASETS
from p1_ddpm.infer import DEFAULT_CHECKPOINT, DEFAULTS, sample_index
from p1_ddpm.model import load_unet, schedule_of
from p1_ddpm.samplers import SAMPLERS, sample_conditional_images

REVERSE_TIMESTEPS = (999, 800, 600, 400, 200, 0)


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--scale", type=int, default=3, help="pixel magnification in the figures")
    p.add_argument("--device", default="auto")
    add_precision_flag(p, what="the UNet's forward pass")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model, config = load_unet(args.checkpoint, device)
    out = check_writable(args.out)
    ab = schedule_of(config)
    dtype = autocast_dtype(device, args.precision)
    digits = [str(d) for d in range(10)]

    for k, name in enumerate(DIGIT_DATASETS[: config["model"]["num_domains"]]):
        cond = torch.tensor([[d, k] for d in range(10) for _ in range(10)])
        idx = [sample_index(k, d, i) for d in range(10) for i in range(1, 11)]
        imgs = sample_conditional_images(model, cond, idx, ab, args.seed, args.sampler, args.steps, args.guidance,
                                         device=device, amp_dtype=dtype)
        path = save_grid(out / f"grid_{name}.png", to_uint8(imgs), 10, 10, row_labels=digits, scale=args.scale)
        print(f"wrote {path}")

    # The ancestral chain: x_999 is the initial noise; the step at t turns x_t into x_{t-1}, and the step
    # at t = 0 gives the final image. Keep x_800, x_600, x_400, x_200 and the final image.
    mnistm = DIGIT_DATASETS.index("mnistm")
    cond = torch.tensor([[0, mnistm], [1, mnistm]])
    idx = [sample_index(mnistm, 0, 1), sample_index(mnistm, 1, 1)]
    size = model.config["image_size"]
    frames = {999: PerSampleNoise(args.seed, idx).randn(3, size, size)}  # what sample_conditional_images() starts from

    def record(i, t, x, x0):
        if t - 1 in REVERSE_TIMESTEPS or t == 0:
            frames[max(t - 1, 0)] = x.detach().cpu().clone()

    sample_conditional_images(model, cond, idx, ab, args.seed, "ddpm", guidance=args.guidance, device=device,
                              amp_dtype=dtype, callback=record)
    rows = torch.stack([frames[t] for t in REVERSE_TIMESTEPS], dim=1)  # (2, 6, C, H, W)
    path = save_grid(out / "reverse_process.png", to_uint8(rows.flatten(0, 1)), 2, len(REVERSE_TIMESTEPS),
                     row_labels=["0", "1"], col_labels=[f"t={t}" for t in REVERSE_TIMESTEPS], scale=args.scale)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
