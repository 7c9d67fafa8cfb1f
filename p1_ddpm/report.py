#!/usr/bin/env python
"""Report figures for problem 1.

    python p1_ddpm/report.py --out figs/ [--year 2023|2024|2025]

Writes
  figs/grid_mnistm.png, figs/grid_svhn.png  10x10: rows digits 0-9, columns different noise
  figs/reverse_process.png                  the reverse process the --year's report asks for, at six timesteps
                                            of the ancestral DDPM chain, t = 999, 800, 600, 400, 200, 0:
                                              2023: the first "0" (MNIST-M)
                                              2024: the first "0" of MNIST-M and the first "0" of SVHN
                                              2025 (default): the first "0" (MNIST-M) and the first "1" (SVHN)
                                            one row each, labelled with its data set and digit
and beside each figure FIG.png.json (what it shows, checkpoint, sampler, steps, seed, the command).
Each digit comes from the data set that year's hw2_1.sh puts it in (2025: even digits MNIST-M, odd SVHN),
and "first" is image 001, with that image's noise. The grids use the same sampler settings (and the
same noise) as infer.py, so they show what hw2_1.sh hands in.
"""
from __future__ import annotations

import argparse

import torch

from common.config import HelpFormatter, finite_float, int_at_least
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.figure_info import command_line, write_figure_info
from common.fileio import check_writable
from common.images import save_grid, to_uint8
from common.seeding import PerSampleNoise
from p1_ddpm.data import DIGIT_DATASETS
from p1_ddpm.infer import DEFAULT_CHECKPOINT, DEFAULTS, LAYOUTS, layout_jobs, sample_index
from p1_ddpm.model import load_unet, schedule_of
from p1_ddpm.samplers import SAMPLERS, sample_conditional_images

REVERSE_TIMESTEPS = (999, 800, 600, 400, 200, 0)
YEARS = LAYOUTS  # a course year's report follows that year's hand-in layout
REVERSE_DIGITS = {"2023": (0,), "2024": (0,), "2025": (0, 1)}  # the digits whose reverse process each year shows
DATASET_TITLES = {"mnistm": "MNIST-M", "svhn": "SVHN"}


def reverse_rows(year: str) -> list[tuple[int, int]]:
    """(data set index, digit) of each row of the year's reverse-process figure: every data set that year's
    hw2_1.sh draws the digit from, in hand-in order (2024: MNIST-M then SVHN; 2025: each digit from one)."""
    return [(k, d) for d in REVERSE_DIGITS[year] for _, k, digit, _ in layout_jobs(year) if digit == d]


def row_label(dataset: int, digit: int) -> str:
    return f"{DATASET_TITLES[DIGIT_DATASETS[dataset]]} {digit}"


def reverse_process(model, ab: torch.Tensor, rows: list[tuple[int, int]], seed: int, guidance: float,
                    device="cpu", amp_dtype=None) -> torch.Tensor:
    """(len(rows), len(REVERSE_TIMESTEPS), C, H, W): the ancestral DDPM chain of the first image (index 1)
    of each (data set, digit), from the noise hw2_1.sh gives that image, at REVERSE_TIMESTEPS."""
    cond = torch.tensor([[d, k] for k, d in rows])
    idx = [sample_index(k, d, 1) for k, d in rows]
    cfg = model.config
    # what sample_conditional_images() starts from
    frames = {999: PerSampleNoise(seed, idx).randn(cfg["in_channels"], cfg["image_size"], cfg["image_size"])}

    # The step at t turns x_t into x_{t-1}, and the step at t = 0 gives the final image. Keep x_800, x_600,
    # x_400, x_200 and the final image.
    def record(i, t, x, x0):
        if t - 1 in REVERSE_TIMESTEPS or t == 0:
            frames[max(t - 1, 0)] = x.detach().cpu().clone()

    sample_conditional_images(model, cond, idx, ab, seed, "ddpm", guidance=guidance, device=device,
                              amp_dtype=amp_dtype, callback=record)
    return torch.stack([frames[t] for t in REVERSE_TIMESTEPS], dim=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument("--year", choices=YEARS, default=YEARS[-1],
                   help="course year: which digits and data sets the reverse-process figure shows")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="weights written by p1_ddpm/train.py")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"], help="sampler of the grids")
    p.add_argument("--steps", type=int_at_least(1), default=DEFAULTS["steps"], help="sampling steps of the grids")
    p.add_argument("--guidance", type=finite_float, default=DEFAULTS["guidance"],
                   help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the starting noise")
    p.add_argument("--scale", type=int_at_least(1), default=3, help="pixel magnification in the figures")
    add_device_flag(p)
    add_precision_flag(p, what="the UNet's forward pass")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    model, config = load_unet(args.checkpoint, device)
    rows = reverse_rows(args.year)
    missing = sorted({DIGIT_DATASETS[k] for k, _ in rows} - set(DIGIT_DATASETS[: config["model"]["num_domains"]]))
    if missing:
        raise UserError(f"{args.checkpoint}: the {args.year} reverse-process figure needs data set {missing[0]}, "
                        f"which this model was not trained on")
    out = check_writable(args.out)
    ab = schedule_of(config)
    dtype = autocast_dtype(device, args.precision)
    digits = [str(d) for d in range(10)]
    cmd = command_line(__file__, argv)
    settings = dict(checkpoint=args.checkpoint, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                    seed=args.seed)

    for k, name in enumerate(DIGIT_DATASETS[: config["model"]["num_domains"]]):
        cond = torch.tensor([[d, k] for d in range(10) for _ in range(10)])
        idx = [sample_index(k, d, i) for d in range(10) for i in range(1, 11)]
        imgs = sample_conditional_images(model, cond, idx, ab, args.seed, args.sampler, args.steps, args.guidance,
                                         device=device, amp_dtype=dtype)
        path = save_grid(out / f"grid_{name}.png", to_uint8(imgs), 10, 10, row_labels=digits, scale=args.scale)
        write_figure_info(path, f"{DATASET_TITLES[name]} samples, 10x10: rows digits 0-9, columns ten noise draws",
                          cmd, **settings)
        print(f"wrote {path}")

    frames = reverse_process(model, ab, rows, args.seed, args.guidance, device, dtype)
    path = save_grid(out / "reverse_process.png", to_uint8(frames.flatten(0, 1)), len(rows), len(REVERSE_TIMESTEPS),
                     row_labels=[row_label(k, d) for k, d in rows],
                     col_labels=[f"t={t}" for t in REVERSE_TIMESTEPS], scale=args.scale)
    write_figure_info(path, f"reverse process ({args.year} report) of {', '.join(row_label(k, d) for k, d in rows)}"
                      f" at t = {', '.join(map(str, REVERSE_TIMESTEPS))}", cmd,
                      **{**settings, "sampler": "ddpm (ancestral)", "steps": len(ab)})
    print(f"wrote {path} ({args.year}: {', '.join(row_label(k, d) for k, d in rows)})")


if __name__ == "__main__":
    main()
