#!/usr/bin/env python
"""Score generated i-CLEVR images with the lab's accuracy.

    python scripts/evaluate_iclevr.py --images OUT/test --labels test.json --checkpoint checkpoint.pth
    python scripts/evaluate_iclevr.py --images OUT/test --labels test.json --judge own

--images: a folder holding one image per label list, named 0.png, 1.png, ... (what
p1_ddpm/infer.py --task iclevr writes), or an 8x4-style grid PNG of 64x64 tiles with 2-px padding.
Judges:
  lab  the lab's evaluator architecture: torchvision resnet18 whose fc is Linear(512, 24) + sigmoid,
       weights under the key 'model' of --checkpoint (a local checkpoint.pth; nothing is downloaded);
       inputs in [-1, 1] (normalised with mean 0.5, std 0.5), 64x64.
  own  this project's multi-label CNN trained on rendered images (scripts/train_iclevr_judge.py;
       weights shipped in checkpoints/iclevr_judge.safetensors, or --checkpoint).
Accuracy (the lab's definition): for each image with k true objects, count how many of the judge's
top-k classes are true; sum over images and divide by the sum of k. The last line is `accuracy <value>`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic
from p1_ddpm.iclevr_judge import (
    DEFAULT_OBJECTS,
    OWN_JUDGE,
    judge_scores,
    load_lab_evaluator,
    load_own_judge,
    topk_accuracy,
)


def read_images(path: Path, count: int) -> torch.Tensor:
    """`count` images from a folder of 0.png..N-1.png, or the tiles of a grid PNG (64x64, 2-px padding)."""
    from PIL import Image
    if path.is_dir():
        imgs = []
        for i in range(count):
            f = path / f"{i}.png"
            if not f.is_file():
                raise UserError(
                    f"{f}: image missing (expected {count} images 0.png..{count - 1}.png, one per label list)"
                )
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC)))
        extra = sorted((f.name for f in path.glob("*.png") if f.stem.isdigit() and int(f.stem) >= count),
                       key=lambda name: int(name[:-4]))
        if extra:  # more images than label lists: most likely the other split's --labels
            print(f"note: {path} holds {len(extra)} numbered image(s) beyond the {count} label lists "
                  f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); only 0.png..{count - 1}.png "
                  f"were scored", file=sys.stderr)
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    if not path.is_file():
        raise UserError(f"{path}: no such image folder or grid file")
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    tile, pad = 64, 2
    if any((side - pad) % (tile + pad) or side < pad + tile + pad for side in grid.shape[:2]):
        raise UserError(f"{path}: {grid.shape[1]}x{grid.shape[0]} px is not a grid of 64-px tiles with 2-px "
                        f"padding (each side is 2 + k x 66 px, as p1_ddpm/infer.py --task iclevr writes)")
    cols = (grid.shape[1] - pad) // (tile + pad)
    rows = (grid.shape[0] - pad) // (tile + pad)
    if rows * cols < count:
        raise UserError(f"{path}: a grid of {rows}x{cols} 64-px tiles holds fewer than {count} images")
    tiles = [
        grid[
            pad + r * (tile + pad) : pad + r * (tile + pad) + tile,
            pad + c * (tile + pad) : pad + c * (tile + pad) + tile,
        ]
        for r in range(rows)
        for c in range(cols)
    ][:count]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)


def _short(path) -> str:
    """A path relative to the repository when inside it (as the page and the JSON show it)."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except (ValueError, OSError):
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", required=True, help="folder of 0.png..N-1.png (or a grid PNG)")
    p.add_argument("--labels", required=True, help="the label lists (test.json / new_test.json style)")
    p.add_argument("--objects", default=str(DEFAULT_OBJECTS), help="objects.json (name -> index)")
    p.add_argument("--judge", choices=("lab", "own"), default="lab", help="lab: resnet18 evaluator; own: shipped CNN")
    p.add_argument("--checkpoint", default=None,
                   help="judge weights: the lab's checkpoint.pth (required for --judge lab); "
                        "default for --judge own: checkpoints/iclevr_judge.safetensors")
    p.add_argument("--json", default=None, help="also write the score here (judge, checkpoint, hits, total, accuracy)")
    return p


@cli_main
def main(argv=None) -> float:
    args = build_parser().parse_args(argv)
    from p1_ddpm.iclevr_data import load_label_lists, load_objects
    objects = load_objects(args.objects)
    lists, cond = load_label_lists(args.labels, objects)
    if args.judge == "lab":
        if args.checkpoint is None:
            raise UserError("--judge lab needs --checkpoint checkpoint.pth (the lab's evaluator weights); "
                            "or use --judge own")
        net = load_lab_evaluator(args.checkpoint)
    else:
        net = load_own_judge(args.checkpoint or OWN_JUDGE)
    images = read_images(Path(args.images), len(lists))
    hits, total = topk_accuracy(judge_scores(net, images), cond)
    acc = hits / total
    print(f"{args.judge} judge: {hits}/{total} objects in the top-k over {len(lists)} images")
    print(f"accuracy {acc:.4f}")
    if args.json:
        judge = "the lab's evaluator (ResNet-18)" if args.judge == "lab" else "this project's judge (iclevr_judge)"
        report = {"judge": args.judge, "grader": judge, "checkpoint": _short(args.checkpoint or OWN_JUDGE),
                  "images": str(args.images), "labels": str(args.labels), "image_count": len(lists),
                  "hits": int(hits), "total": int(total), "accuracy": float(acc)}
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return acc


if __name__ == "__main__":
    main()
