#!/usr/bin/env python
"""Generate the digit images the course asks for, from a trained conditional DDPM.

    python p1_ddpm/infer.py --out OUT                # 2024 layout: OUT/mnistm/ and OUT/svhn/, 50 per digit
    python p1_ddpm/infer.py --layout 2023 --out OUT  # one flat folder, MNIST-M only, 100 per digit
    python p1_ddpm/infer.py --layout 2025 --out OUT  # even digits in OUT/mnistm/, odd digits in OUT/svhn/

Files are named {digit}_{index:03d}.png (index from 001), 28x28 RGB. Image k's noise comes only from
--seed and (dataset, digit, index), so any image is the same whatever the layout or --batch-size.
Sampler: DPM-Solver++(2M) by default (see BENCHMARKS.md for why); --sampler ddim|ddpm for the others.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.device import autocast, autocast_dtype, pick_device  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402
from common.fileio import check_writable, ensure_dir  # noqa: E402
from common.images import save_pngs, to_uint8  # noqa: E402
from common.schedules import alphas_cumprod, make_betas  # noqa: E402
from common.seeding import seed_everything  # noqa: E402
from p1_ddpm.data import DIGIT_DATASETS  # noqa: E402
from p1_ddpm.model import load_unet  # noqa: E402
from p1_ddpm.samplers import SAMPLERS, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "p1_ddpm.safetensors"
DEFAULTS = dict(sampler="dpmpp2m", steps=12, guidance=7.0, eta=0.0, seed=42)
LAYOUTS = ("2023", "2024", "2025")


def layout_jobs(layout: str) -> list[tuple[str, int, int, int]]:
    """(subfolder, dataset index, digit, count) for a course layout; subfolder '' is OUT itself."""
    mnistm, svhn = DIGIT_DATASETS.index("mnistm"), DIGIT_DATASETS.index("svhn")
    if layout == "2023":
        return [("", mnistm, d, 100) for d in range(10)]
    if layout == "2024":
        return [(name, k, d, 50) for name, k in (("mnistm", mnistm), ("svhn", svhn)) for d in range(10)]
    if layout == "2025":
        return [("mnistm", mnistm, d, 50) for d in range(0, 10, 2)] + [("svhn", svhn, d, 50) for d in range(1, 10, 2)]
    raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def sample_index(dataset: int, digit: int, i: int) -> int:
    """The noise identity of image i (1-based) of a digit and dataset: stable across layouts."""
    return dataset * 100_000 + digit * 1_000 + i


def plan(layout: str) -> tuple[list[str], torch.Tensor, list[int]]:
    """Relative file names, conditions [digit, dataset] and noise indices of every image of a layout."""
    names, cond, indices = [], [], []
    for sub, k, d, count in layout_jobs(layout):
        for i in range(1, count + 1):
            names.append(os.path.join(sub, f"{d}_{i:03d}.png"))
            cond.append([d, k])
            indices.append(sample_index(k, d, i))
    return names, torch.tensor(cond, dtype=torch.long), indices


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--layout", choices=LAYOUTS, default="2024", help="which year's output layout")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="weights written by p1_ddpm/train.py")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"],
                   help="dpmpp2m (fast, default), ddim, or ddpm (ancestral, all 1000 steps)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampling steps (ignored by ddpm)")
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"],
                   help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u); 1 = no guidance")
    p.add_argument("--eta", type=float, default=DEFAULTS["eta"], help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--batch-size", type=int, default=1000, help="images per batch (the guided forward doubles it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    t0 = time.time()
    device = pick_device(args.device)
    model, config = load_unet(args.checkpoint, device)
    out = check_writable(args.out)  # fail before spending time sampling, creating nothing
    seed_everything(args.seed)
    if config["model"].get("condition") != "digits":
        raise UserError(f"{args.checkpoint}: not a digits model (condition {config['model'].get('condition')!r})")
    ab = alphas_cumprod(make_betas(config["schedule"], config["num_train_steps"]))
    names, cond, indices = plan(args.layout)
    dtype = autocast_dtype(device, args.precision)
    images = generate(model, cond, indices, ab, args.seed, args.sampler, args.steps, args.guidance, args.eta,
                      batch_size=args.batch_size, device=device,
                      autocast_ctx=lambda: autocast(device, dtype), progress=not args.quiet)
    for sub in {os.path.dirname(n) for n in names}:
        ensure_dir(out / sub)
    save_pngs(out, names, to_uint8(images))
    print(f"wrote {len(names)} images to {out} ({args.layout} layout, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance}, seed {args.seed}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
