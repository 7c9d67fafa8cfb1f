#!/usr/bin/env python
"""Write the course's digits layout from numpy arrays.

Reads `<npz-dir>/{mnistm,svhn_partial,usps,mnist}.npz` (keys x_train y_train [x_test y_test], as in
shared/data/digits beside the repository, the default) and writes `<out>/{mnistm,svhn,usps,mnist}/data/*.png`
with `train.csv`, `val.csv` and `test.csv` (header `image_name,label`), every image 28x28 RGB (grey USPS and MNIST
are copied into all three channels; USPS is resized from 16x16). `val.csv` is a random
`--val-fraction` of the training arrays (seeded), so models are chosen without touching the test
split. svhn_partial has no test arrays: its images 0-899 are train/val and 900-1082 are test.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from common.config import HelpFormatter, float_in, int_at_least
from common.errors import UserError, cli_main
from common.fileio import atomic_path, ensure_dir, write_text_atomic
from common.paths import SHARED_DATA

SOURCES = {"mnistm": "mnistm.npz", "svhn": "svhn_partial.npz", "usps": "usps.npz", "mnist": "mnist.npz"}
DEFAULT_DATASETS = "mnistm,svhn,usps"  # the course's three; mnist (for P4's MNIST -> MNIST-M) on request
SVHN_TRAIN_COUNT = 900
# the course data beside the repository, wherever the command is run from
SHARED_DIGITS = SHARED_DATA / "digits"


def to_rgb28(img: np.ndarray) -> np.ndarray:
    im = Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB").convert("RGB")
    if im.size != (28, 28):
        im = im.resize((28, 28), Image.BILINEAR)
    return np.asarray(im)


def load_arrays(npz_path: Path, name: str):
    if not npz_path.is_file():
        raise UserError(f"{npz_path}: file not found")
    try:
        with np.load(npz_path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # np.load raises many types on a corrupt file
        raise UserError(f"{npz_path}: not a readable .npz ({e})") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise UserError(f"{npz_path}: missing array {key!r} (has {sorted(arrays)})")
    for split in ("train", "test"):
        if f"x_{split}" in arrays and len(arrays[f"x_{split}"]) != len(arrays.get(f"y_{split}", ())):
            raise UserError(f"{npz_path}: x_{split} holds {len(arrays[f'x_{split}'])} images but y_{split} "
                            f"{len(arrays.get(f'y_{split}', ()))} labels")
    x, y = arrays["x_train"], arrays["y_train"]
    if name == "svhn" and "x_test" not in arrays:
        return x[:SVHN_TRAIN_COUNT], y[:SVHN_TRAIN_COUNT], x[SVHN_TRAIN_COUNT:], y[SVHN_TRAIN_COUNT:]
    return x, y, arrays.get("x_test"), arrays.get("y_test")


def write_split(folder: Path, csv_name: str, items: list[tuple[str, np.ndarray, int]]) -> None:
    lines = ["image_name,label"]
    for fname, img, label in tqdm(items, desc=f"{folder.name}/{csv_name}", leave=False):
        with atomic_path(folder / "data" / fname) as tmp:
            Image.fromarray(to_rgb28(img)).save(tmp, format="PNG")
        lines.append(f"{fname},{int(label)}")
    write_text_atomic(folder / csv_name, "\n".join(lines) + "\n")


def prepare(npz_dir: Path, out: Path, names, val_fraction: float, seed: int, limit: int | None) -> None:
    for name in names:
        x, y, xt, yt = load_arrays(npz_dir / SOURCES[name], name)
        if limit:
            x, y = x[:limit], y[:limit]
            xt, yt = (xt[:limit], yt[:limit]) if xt is not None else (None, None)
        folder = ensure_dir(out / name)
        ensure_dir(folder / "data")
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = int(round(len(x) * val_fraction))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        write_split(folder, "train.csv", [(f"{i:05d}.png", x[i], y[i]) for i in train_idx])
        write_split(folder, "val.csv", [(f"{i:05d}.png", x[i], y[i]) for i in val_idx])
        if xt is not None:
            write_split(folder, "test.csv", [(f"test_{i:05d}.png", xt[i], yt[i]) for i in range(len(xt))])
        print(f"{name}: {len(train_idx)} train, {len(val_idx)} val, {0 if xt is None else len(xt)} test -> {folder}")


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--npz-dir", default=str(SHARED_DIGITS),
                   help="folder with mnistm.npz, svhn_partial.npz, usps.npz (and mnist.npz for --datasets mnist)")
    p.add_argument("--out", required=True, help="output root, e.g. hw2_data/digits")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help=f"comma-separated subset of {','.join(SOURCES)}, or 'all' (default: {DEFAULT_DATASETS})")
    p.add_argument("--val-fraction", type=float_in(0, 1, high_open=True), default=0.1,
                   help="share of the training arrays held out as val.csv")
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="keep only the first N images of each split (for tests; default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    args = p.parse_args(argv)
    names = (
        list(SOURCES) if args.datasets.strip() == "all" else [n.strip() for n in args.datasets.split(",") if n.strip()]
    )
    if not names:
        raise UserError(f"--datasets names no data set (choose from {', '.join(SOURCES)}, or 'all')")
    for n in names:
        if n not in SOURCES:
            raise UserError(f"--datasets: unknown data set {n!r} (choose from {', '.join(SOURCES)})")
    prepare(Path(args.npz_dir), Path(args.out), names, args.val_fraction, args.seed, args.limit)


if __name__ == "__main__":
    main()
