#!/usr/bin/env python
"""Generate the digit images the course asks for, from a trained conditional DDPM.

    python p1_ddpm/infer.py --out OUT              # 2025 layout: even digits in OUT/mnistm/, odd digits in OUT/svhn/
    python p1_ddpm/infer.py --year 2024 --out OUT  # OUT/mnistm/ and OUT/svhn/, 50 per digit each
    python p1_ddpm/infer.py --year 2023 --out OUT  # one flat folder, MNIST-M only, 100 per digit

Files are named {digit}_{index:03d}.png (index from 001), 28x28 RGB. Image k's noise comes only from
--seed and (dataset, digit, index), so any image is the same whatever the layout or --batch-size (to the bit
on the CPU, batch sizes 1 and 3 included: common.seeding.BATCH_QUANTUM; CUDA kernels may round otherwise).
Sampler: DPM-Solver++(2M) by default (see BENCHMARKS.md for why); --sampler ddim|ddpm for the others.

i-CLEVR (--task iclevr, the multi-label lab variant, 64x64):
    python p1_ddpm/infer.py --task iclevr --out OUT        # test.json and new_test.json from assets/iclevr/
    python p1_ddpm/infer.py --task iclevr --labels test.json --out OUT
    python p1_ddpm/infer.py --task iclevr --denoise "red sphere,cyan cylinder,cyan cube" --out OUT
writes OUT/<labels stem>/{0..N-1}.png (one image per label list, in file order; image k's noise comes
from --seed and k), OUT/<labels stem>_grid.png (8 per row, 8x4 for the lab's 32 lists), and with
--denoise OUT/denoise.png: the sample for that label list from pure noise (left) to the result (right).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter, finite_float, float_in, int_at_least
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.fileio import all_or_nothing, check_writable, prune_outputs, remove_stale_temps
from common.images import save_grid, save_pngs, to_uint8
from common.seeding import PerSampleNoise, seed_everything
from p1_ddpm.data import DIGIT_DATASETS
from p1_ddpm.model import load_unet, schedule_of
from p1_ddpm.samplers import SAMPLERS, sample_conditional_images

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "p1_ddpm.safetensors"
DEFAULTS = dict(sampler="dpmpp2m", steps=12, guidance=7.0, eta=0.0, seed=42)
ICLEVR_CHECKPOINT = REPO / "checkpoints" / "p1_iclevr.safetensors"
ICLEVR_ASSETS = REPO / "assets" / "iclevr"
# stochastic DDIM (eta 1): on this model the deterministic samplers leave grain on the floor (BENCHMARKS.md)
ICLEVR_DEFAULTS = dict(
    sampler="ddim", steps=50, guidance=4.0, eta=1.0, seed=42
)  # guidance: ICLEVR.md (validation lists)
GRID_COLUMNS = 8
LAYOUTS = ("2023", "2024", "2025")
LAYOUT_FOLDERS = ("", "mnistm", "svhn")  # every folder some layout writes into
DIGIT_IMAGE_NAME = r"\d_\d{3}\.png"  # what layout_jobs names its images


def layout_jobs(layout: str) -> list[tuple[str, int, int, int]]:
    """(subfolder, dataset index, digit, count) for a course layout; subfolder '' is OUT itself."""
    mnistm, svhn = DIGIT_DATASETS.index("mnistm"), DIGIT_DATASETS.index("svhn")
    if layout == "2023":
        return [("", mnistm, d, 100) for d in range(10)]
    if layout == "2024":
        return [(name, k, d, 50) for name, k in (("mnistm", mnistm), ("svhn", svhn)) for d in range(10)]
    if layout == "2025":
        return [("mnistm", mnistm, d, 50) for d in range(0, 10, 2)] + [("svhn", svhn, d, 50) for d in range(1, 10, 2)]
    raise UserError(f"--year must be one of {', '.join(LAYOUTS)}, got {layout!r}")


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--task", choices=("digits", "iclevr"), default="digits",
                   help="digits (the course's P1) or iclevr (multi-label objects, 64x64)")
    # --layout: its name before it matched report.py's --year (the hand-in scripts of earlier checkouts use it)
    p.add_argument("--year", "--layout", dest="year", choices=LAYOUTS, default=LAYOUTS[-1],
                   help="digits: which course year's output layout (the latest is the top-level hw2_1.sh's)")
    p.add_argument("--checkpoint", default=None, help="weights written by p1_ddpm/train.py; default: "
                   "checkpoints/p1_ddpm.safetensors (digits), checkpoints/p1_iclevr.safetensors (iclevr)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="iclevr: label files (lists of 1-3 object names each); default: assets/iclevr/test.json "
                        "and new_test.json (unless only --denoise is given)")
    p.add_argument("--objects", default=None,
                   help="iclevr: objects.json; default: the mapping stored in the checkpoint")
    p.add_argument("--denoise", default=None,
                   help='iclevr: comma-separated object names, e.g. "red sphere,cyan cylinder,cyan cube": write '
                        "OUT/denoise.png, the denoising process from noise to the result")
    p.add_argument("--denoise-frames", type=int_at_least(8), default=10,
                   help="iclevr: images in the denoising grid (>= 8)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="dpmpp2m (fast, the digits default), ddim (the iclevr default, with --eta 1), "
                        "or ddpm (ancestral, all 1000 steps)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help=f"sampling steps (ignored by ddpm); default {DEFAULTS['steps']} (digits), "
                        f"{ICLEVR_DEFAULTS['steps']} (iclevr)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u); 1 = no guidance; "
                        f"default {DEFAULTS['guidance']} (digits), {ICLEVR_DEFAULTS['guidance']} (iclevr)")
    p.add_argument("--eta", type=float_in(0), default=None,
                   help="DDIM eta, >= 0 (0 = deterministic); default 0 (digits), 1 (iclevr)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of every image's starting noise (with its data set, digit and index)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1000,
                   help="images per batch (the guided forward doubles it)")
    add_device_flag(p)
    add_precision_flag(p, what="the UNet's forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main(sigterm=True)
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    task_defaults = DEFAULTS if args.task == "digits" else ICLEVR_DEFAULTS
    for key in ("sampler", "steps", "guidance", "eta"):
        if getattr(args, key) is None:
            setattr(args, key, task_defaults[key])
    if args.checkpoint is None:
        args.checkpoint = str(DEFAULT_CHECKPOINT if args.task == "digits" else ICLEVR_CHECKPOINT)
    if args.task == "iclevr":
        return main_iclevr(args)
    t0 = time.time()
    device = pick_device(args.device)
    out = check_writable(args.out)  # fail before loading or sampling anything, creating nothing
    model, config = load_unet(args.checkpoint, device)
    check_steps(args, config)
    seed_everything(args.seed)
    if config["model"].get("condition") != "digits":
        raise UserError(f"{args.checkpoint}: not a digits model (condition {config['model'].get('condition')!r})")
    ab = schedule_of(config)
    names, cond, indices = plan(args.year)
    remove_stale_temps(*{out / os.path.dirname(n) for n in names})  # what a killed earlier run left
    dtype = autocast_dtype(device, args.precision)
    images = sample_conditional_images(model, cond, indices, ab, args.seed, args.sampler, args.steps, args.guidance,
                                       args.eta, batch_size=args.batch_size, device=device, amp_dtype=dtype,
                                       progress=not args.quiet)
    save_pngs(out, names, to_uint8(images))  # all or nothing: a failure or SIGTERM adds no file and no folder
    # digit images of an earlier run into this folder (another year's layout) would be graded too
    prune_outputs(out, names, LAYOUT_FOLDERS, DIGIT_IMAGE_NAME)
    print(f"wrote {len(names)} images to {out} ({args.year} layout, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance}, seed {args.seed}) in {time.time() - t0:.1f} s")


def check_steps(args, config: dict) -> None:
    """--steps of at most the model's T (ddpm takes all T whatever it says); more is a one-line UserError."""
    limit = config["num_train_steps"]
    if args.sampler != "ddpm" and args.steps > limit:
        raise UserError(f"--steps must be at most {limit} (the diffusion steps of {args.checkpoint}), "
                        f"got {args.steps}")


def sampler_calls(sampler: str, num_train_steps: int, steps: int) -> int:
    """How many steps (callback calls) `sampler` takes: all T for ddpm, else --steps (check_steps has kept it
    at most T)."""
    return num_train_steps if sampler == "ddpm" else steps


def denoise_frame_indices(num_states: int, frames: int) -> list[int]:
    """`frames` indices into the num_states sampler states (0 = noise, last = result), evenly spaced."""
    frames = min(frames, num_states)
    return sorted({round(i * (num_states - 1) / (frames - 1)) for i in range(frames)})


def main_iclevr(args) -> None:
    from p1_ddpm.iclevr_data import load_label_lists, load_objects, multi_hot
    t0 = time.time()
    device = pick_device(args.device)
    out = check_writable(args.out)  # fail before loading or sampling anything, creating nothing
    model, config = load_unet(args.checkpoint, device)
    check_steps(args, config)
    if config["model"].get("condition") != "multihot":
        raise UserError(f"{args.checkpoint}: not an i-CLEVR model (condition {config['model'].get('condition')!r})")
    if args.objects is not None:
        objects = load_objects(args.objects)
    elif "objects" in config:
        objects = config["objects"]
    else:
        objects = load_objects(ICLEVR_ASSETS / "objects.json")
    if len(objects) != config["model"]["num_labels"]:
        raise UserError(f"{args.objects or args.checkpoint}: {len(objects)} objects, but the model has "
                        f"{config['model']['num_labels']} labels")
    label_files = args.labels
    if label_files is None:
        label_files = [] if args.denoise else [str(ICLEVR_ASSETS / "test.json"), str(ICLEVR_ASSETS / "new_test.json")]
    jobs = [(Path(f).stem, *load_label_lists(f, objects)) for f in label_files]
    stems = [j[0] for j in jobs]
    if len(set(stems)) != len(stems):
        raise UserError(f"label files share a name ({', '.join(stems)}): their outputs would collide")
    denoise_cond = None
    if args.denoise is not None:
        names = [n.strip() for n in args.denoise.split(",") if n.strip()]
        denoise_cond = multi_hot(names, objects, "--denoise")[None]
        states = 1 + sampler_calls(args.sampler, config["num_train_steps"], args.steps)
        if len(denoise_frame_indices(states, args.denoise_frames)) < 8:  # checked before anything is written
            raise UserError(f"--denoise needs at least 8 frames: use --steps >= 7 (got --steps {args.steps})")
    remove_stale_temps(out, *(out / stem for stem in stems))  # every input checked: only now spend time sampling
    seed_everything(args.seed)
    ab = schedule_of(config)
    dtype = autocast_dtype(device, args.precision)
    common = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
                  batch_size=args.batch_size, device=device, amp_dtype=dtype)
    size = config["model"]["image_size"]
    notes = []
    with all_or_nothing():  # every file lands at the end: a failure or SIGTERM adds no file and no folder
        for stem, _lists, cond in jobs:
            images = to_uint8(sample_conditional_images(model, cond, range(len(cond)), ab, args.seed,
                                                        progress=not args.quiet, **common))
            save_pngs(out / stem, [f"{k}.png" for k in range(len(images))], images)
            rows = -(-len(images) // GRID_COLUMNS)
            cols = min(GRID_COLUMNS, len(images))
            blank = np.full((rows * cols - len(images), size, size, 3), 255, np.uint8)
            save_grid(out / f"{stem}_grid.png", np.concatenate([images, blank]), rows, cols)
            notes.append(f"wrote {len(images)} images to {out / stem} and the grid {out / (stem + '_grid.png')}")
        if denoise_cond is not None:
            states = []

            def record(i, t, x, x0):
                states.append(x.detach().float().cpu().clone())

            x_T = PerSampleNoise(args.seed, [0]).randn(3, size, size)  # the sampler's start for index 0
            sample_conditional_images(model, denoise_cond, [0], ab, args.seed, callback=record, **common)
            states = [x_T] + states
            keep = denoise_frame_indices(len(states), args.denoise_frames)
            if len(keep) < 8:
                raise UserError(f"--denoise needs at least 8 frames: use --steps >= 7 (got --steps {args.steps})")
            frames = to_uint8(torch.cat([states[i] for i in keep]))
            save_grid(out / "denoise.png", frames, 1, len(frames))
            notes.append(f"wrote {out / 'denoise.png'} ({len(frames)} frames from noise to result: {args.denoise})")
    print("\n".join(notes))
    print(f"done in {time.time() - t0:.1f} s ({args.sampler} {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed})")


if __name__ == "__main__":
    main()
