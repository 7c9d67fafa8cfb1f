#!/usr/bin/env python
"""Mean squared error between generated faces and the course's ground truth, in 0-255 pixel units.

    python scripts/evaluate_mse.py --pred OUT --gt hw2_data/face/GT

Every GT/NAME.png is compared with OUT/NAME.png: both read as 8-bit RGB, MSE = mean over all pixels and
channels of (pred - gt)^2, as the course measures it (pass mark: mean under 20). One line per image,
then `mean mse <value>` last. A file present on only one side, or two images of different sizes, is an
error (exit status 2), not a skipped image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.config import HelpFormatter
from common.datasets import PNG_SUFFIXES, list_images
from common.errors import UserError, cli_main
from common.fileio import check_writable_file, write_text_atomic


def read_rgb(path: Path) -> np.ndarray:
    """(H,W,3) uint8; a clear error for unreadable files and non-8-bit images."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "P", "LA"):
                raise UserError(f"{path}: image mode {im.mode} is not 8-bit RGB")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def png_files_by_name(folder: Path, what: str) -> dict[str, Path]:
    """{file name: path} of the PNGs in a folder (the hand-in and its ground truth are both PNGs)."""
    files = list_images(folder, PNG_SUFFIXES, not_found=f"{what} folder not found",
                        empty=f"no PNG images in the {what} folder")
    return {p.name: p for p in files}


def mse_255(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean of squared differences of two uint8 images, in 0-255 units."""
    d = pred.astype(np.float64) - gt.astype(np.float64)
    return float(np.mean(d * d))


def evaluate(pred_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
    """{name: mse} for every ground-truth image; UserError when a file is missing on either side or sizes differ."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt = png_files_by_name(gt_dir, "ground-truth")
    pred = png_files_by_name(pred_dir, "prediction")
    missing = sorted(set(gt) - set(pred))
    if missing:
        raise UserError(f"{pred_dir / missing[0]}: missing prediction for ground truth {gt_dir / missing[0]} "
                        f"({len(missing)} of {len(gt)} missing)")
    extra = sorted(set(pred) - set(gt))
    if extra:
        raise UserError(f"{gt_dir / extra[0]}: no ground truth for prediction {pred_dir / extra[0]} "
                        f"({len(extra)} without ground truth)")
    scores = {}
    for name in sorted(gt):
        a, b = read_rgb(pred[name]), read_rgb(gt[name])
        if a.shape != b.shape:
            raise UserError(f"{pred[name]}: size {a.shape[1]}x{a.shape[0]} differs from the ground truth's "
                            f"{b.shape[1]}x{b.shape[0]} ({gt[name]})")
        scores[name] = mse_255(a, b)
    return scores


@cli_main(sigterm=True)
def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pred", required=True, help="folder of generated NAME.png")
    p.add_argument("--gt", required=True, help="folder of ground-truth NAME.png (hw2_data/face/GT)")
    p.add_argument("--json", default=None, help="also write {per_image, mean} here")
    args = p.parse_args(argv)
    if args.json:
        check_writable_file(args.json)  # fail now, not after the scoring
    scores = evaluate(args.pred, args.gt)
    mean = float(np.mean(list(scores.values())))
    for name, v in scores.items():
        print(f"{name} {v:.4f}")
    if args.json:
        write_text_atomic(args.json, json.dumps({"per_image": scores, "mean": mean}, indent=2) + "\n")
    print(f"mean mse {mean:.4f}")
    return mean


if __name__ == "__main__":
    main()
