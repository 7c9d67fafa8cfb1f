#!/usr/bin/env python
"""Problem 1 benchmark: hand-in wall time and accuracy, samplers side by side, guidance sweep.

    python scripts/bench_p1.py --lenet ../shared/data/dlcv/Classifier.pth

All rows of one table come from one run on one machine (the device is printed with them).
  A. `bash handin/2024/hw2_1.sh` end to end (process start, model load, 1000 images, PNG writing): wall
     time; course LeNet accuracy on mnistm/ and this project's SVHN classifier on svhn/. The 2024 layout,
     because it draws every digit from both data sets.
  B. Samplers on the same MNIST-M subset (same noise): seconds per image and LeNet accuracy, with
     the 1000-step ancestral sampler as the reference (on a subset: it is ~100x slower).
  C. Guidance scale sweep for the default sampler (mnistm LeNet / svhn own classifier accuracy).
The tables are printed and written into BENCHMARKS.md between the bench_p1 markers.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.config import HelpFormatter, comma_list, finite_float, int_at_least
from common.device import device_name
from common.errors import cli_main
from common.fileio import write_text_atomic
from common.images import to_uint8
from common.schedules import alphas_cumprod, make_betas
from p1_ddpm.infer import DEFAULT_CHECKPOINT, DEFAULTS, sample_index
from p1_ddpm.model import load_unet
from p1_ddpm.samplers import sample_conditional_images
from scripts.benchmarks import replace_section
from scripts.digit_classifiers import load_course_lenet, load_svhn_net, predict
from scripts.evaluate_digits import evaluate_folder

REPO = Path(__file__).resolve().parents[1]
HANDIN_2024 = REPO / "handin" / "2024" / "hw2_1.sh"  # every digit in both mnistm/ and svhn/

DEFAULT_SVHN = REPO / "checkpoints" / "svhn_classifier.safetensors"


def subset(dataset: int, per_digit: int):
    cond = torch.tensor([[d, dataset] for d in range(10) for _ in range(per_digit)])
    idx = [sample_index(dataset, d, i) for d in range(10) for i in range(1, per_digit + 1)]
    return cond, idx


def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred, _ = predict(model, to_uint8(images))
    return float((pred.cpu() == labels).float().mean())


def timed_generate(model, cond, idx, ab, seed, sampler, steps, guidance):
    t0 = time.perf_counter()
    imgs = sample_conditional_images(model, cond, idx, ab, seed, sampler, steps, guidance, batch_size=1000)
    return imgs, time.perf_counter() - t0


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--lenet", required=True, help="the course grader Classifier.pth")
    p.add_argument("--svhn-classifier", default=str(DEFAULT_SVHN), help="classifier that scores svhn/")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the P1 DDPM to time and score")
    p.add_argument("--ddpm-per-digit", type=int_at_least(1), default=10, help="MNIST-M images per digit for table B")
    p.add_argument("--sweep-per-digit", type=int_at_least(1), default=20,
                   help="images per digit and dataset for table C")
    p.add_argument("--guidances", type=comma_list(finite_float), default="1,2,3,4,5",
                   help="comma-separated guidance scales of table C")
    p.add_argument("--skip", default="", help="comma-separated tables to skip: A,B,C")
    p.add_argument("--write", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    p.add_argument("--json", default=None, help="also write the headline numbers to this JSON file")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling seed")
    args = p.parse_args(argv)
    summary: dict = {"device": None}
    skip = {s.strip().upper() for s in args.skip.split(",") if s.strip()}
    lenet = load_course_lenet(args.lenet)
    svhn_net = load_svhn_net(args.svhn_classifier)
    model, cfg = load_unet(args.checkpoint)
    ab = alphas_cumprod(make_betas(cfg["schedule"], cfg["num_train_steps"]))
    dev = device_name()
    summary["device"] = dev
    ckpt_path = Path(args.checkpoint)
    shown_checkpoint = ckpt_path.relative_to(REPO) if ckpt_path.is_relative_to(REPO) else args.checkpoint
    sections = [
        f"## P1: conditional DDPM (scripts/bench_p1.py)\n\nDevice: {dev}. Checkpoint: "
        f"`{shown_checkpoint}`; defaults: {DEFAULTS['sampler']}, {DEFAULTS['steps']} steps, "
        f"guidance {DEFAULTS['guidance']}, seed {args.seed}."
    ]

    if "A" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(["bash", str(HANDIN_2024), f"{tmp}/out", "--quiet", "--checkpoint", args.checkpoint],
                           check=True)
            wall = time.perf_counter() - t0
            rep = evaluate_folder(Path(tmp) / "out", lenet, svhn_net)
        accs = {k: v["accuracy"] for k, v in rep["sets"].items()}
        summary["hw2_1_seconds"] = round(wall, 1)
        summary.update({f"hw2_1_accuracy_{k}": v for k, v in accs.items()})
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in accs.items())
        sections.append(
            f"### A. `bash handin/2024/hw2_1.sh OUT` (1000 images: 500 MNIST-M, 500 SVHN)\n\n"
            f"Wall time: **{wall:.1f} s** (target <= 120 s).\n\n"
            f"| folder | accuracy |\n|---|---|\n{rows}\n\nmnistm/ is scored by the course LeNet, svhn/ by "
            f"this project's SVHN classifier (`checkpoints/svhn_classifier.safetensors`)."
        )
        print(sections[-1], flush=True)

    if "B" not in skip:
        cond, idx = subset(0, args.ddpm_per_digit)
        labels = cond[:, 0]
        configs = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp2m", 20), ("dpmpp2m", 12), ("dpmpp2m", 8)]
        results = []
        for sampler, steps in configs:
            imgs, secs = timed_generate(model, cond, idx, ab, args.seed, sampler, steps, DEFAULTS["guidance"])
            results.append((sampler, steps, secs / len(idx), accuracy(lenet, imgs, labels)))
            print(results[-1], flush=True)
        ref = results[0][2]
        summary["samplers"] = [
            {
                "sampler": s,
                "steps": n,
                "ms_per_image": round(t * 1000, 2),
                "speedup_vs_ddpm1000": round(ref / t, 1),
                "lenet_accuracy": a,
            }
            for s, n, t, a in results
        ]
        rows = "\n".join(f"| {s} | {n} | {t * 1000:.1f} | {ref / t:.1f}x | {a:.4f} |" for s, n, t, a in results)
        sections.append(
            f"### B. Samplers side by side ({len(idx)} MNIST-M images, same noise, guidance "
            f"{DEFAULTS['guidance']})\n\n| sampler | steps | ms / image | speed-up vs DDPM-1000 | LeNet accuracy |\n"
            f"|---|---|---|---|---|\n{rows}"
        )
        print(sections[-1], flush=True)

    if "C" not in skip:
        rows = []
        for w in args.guidances:
            row = [w]
            for k, judge in ((0, lenet), (1, svhn_net)):
                cond, idx = subset(k, args.sweep_per_digit)
                imgs = sample_conditional_images(
                    model, cond, idx, ab, args.seed, DEFAULTS["sampler"], DEFAULTS["steps"], w, batch_size=1000
                )
                row.append(accuracy(judge, imgs, cond[:, 0]))
            rows.append(row)
            print(row, flush=True)
        summary["guidance_sweep"] = [{"guidance": w, "mnistm_lenet": a, "svhn_own": b} for w, a, b in rows]
        table = "\n".join(f"| {w:g} | {a:.4f} | {b:.4f} |" for w, a, b in rows)
        sections.append(
            f"### C. Guidance scale ({DEFAULTS['sampler']}, {DEFAULTS['steps']} steps, "
            f"{10 * args.sweep_per_digit} images per dataset)\n\n| w | mnistm LeNet | svhn own classifier |\n"
            f"|---|---|---|\n{table}"
        )
        print(sections[-1], flush=True)

    body = "\n\n".join(sections) + "\n\nCommand: `python scripts/bench_p1.py " + " ".join(argv or sys.argv[1:]) + "`\n"
    if args.write:
        replace_section(args.write, "bench_p1", body)
        print(f"updated {args.write}")
    if args.json:
        import json
        write_text_atomic(args.json, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
