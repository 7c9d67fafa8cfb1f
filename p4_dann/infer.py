#!/usr/bin/env python
"""Predict the digit of every image in a folder of target-domain images; write `image_name,label` rows.

    python p4_dann/infer.py hw2_data/digits/usps/data out/usps_pred.csv
    python p4_dann/infer.py some/folder out.csv --target svhn

The target domain is --target, or else read from the folder's path (it must contain `usps` or `svhn`);
the model is the shipped DANN checkpoint for that target (checkpoints/p4_dann_<target>.safetensors)
unless --checkpoint names another. Images (.png/.jpg/.jpeg/.bmp/.webp) are read as RGB (grey copied into
three channels) and resized to 28x28 when they are not already; rows are sorted by file name, header first.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import time
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter
from common.datasets import list_images, load_image, read_label_csv
from common.device import add_device_flag, pick_device
from common.errors import UserError, cli_main
from common.fileio import all_or_nothing, check_writable_file, remove_stale_temps, write_text_atomic
from p4_dann.model import load_dann, predict_logits

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("usps", "svhn")


def default_checkpoint(target: str) -> Path:
    return REPO / "checkpoints" / f"p4_dann_{target}.safetensors"


def target_from_path(path: str | Path) -> str | None:
    """The last of `usps`/`svhn` that appears in the (absolute) path, or None."""
    text = str(Path(path).absolute()).lower()
    hits = [(m.start(), m.group(0)) for m in re.finditer("|".join(TARGETS), text)]
    return max(hits)[1] if hits else None


def resolve_target(image_dir: str, target: str | None) -> str:
    if target is not None:
        if target not in TARGETS:
            raise UserError(f"--target: unknown target domain {target!r} (choose from {', '.join(TARGETS)})")
        return target
    found = target_from_path(image_dir)
    if found is None:
        raise UserError(f"{image_dir}: cannot tell the target domain from the path (it names neither "
                        f"{' nor '.join(TARGETS)}); pass --target {'|'.join(TARGETS)}")
    return found


def load_folder(image_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    files = list_images(image_dir)
    images = np.stack([load_image(f, size=28, mode="RGB", resize=True) for f in files])
    return [f.name for f in files], torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def predict_folder(image_dir: str | Path, checkpoint: str | Path, target: str | None = None,
                   device: str = "auto") -> tuple[list[str], list[int], dict]:
    """(file names, predicted digits, checkpoint config) for every image of `image_dir`."""
    model, config = load_dann(checkpoint, pick_device(device))
    if target is not None and config.get("target") not in (None, target):
        raise UserError(f"{checkpoint}: this model was adapted to {config.get('target')!r}, not {target!r} "
                        f"(pass the checkpoint for {target}, or --target {config.get('target')})")
    names, images = load_folder(image_dir)
    logits = predict_logits(model, images, config["eval_domain"])
    return names, logits.argmax(1).tolist(), config


def score(names: list[str], labels: list[int], truth: dict[str, int], label_csv: str | Path) -> tuple[float, int]:
    """Accuracy of the predictions on the images that `truth` (read from label_csv) lists; (accuracy, count)."""
    pairs = [(y, truth[n]) for n, y in zip(names, labels) if n in truth]
    if not pairs:
        raise UserError(f"{label_csv}: names none of the predicted images")
    return sum(p == t for p, t in pairs) / len(pairs), len(pairs)


def write_predictions(path: str | Path, names: list[str], labels: list[int]) -> None:
    """`image_name,label` rows, quoted by the csv module where a name needs it (a comma, a quote)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_name", "label"])
    writer.writerows([n, int(y)] for n, y in zip(names, labels, strict=True))
    write_text_atomic(path, buf.getvalue())


@cli_main(sigterm=True)
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("image_dir", help="folder of target-domain digit images")
    p.add_argument("out_csv", help="output csv (image_name,label), written atomically")
    p.add_argument("--target", default=None, help=f"target domain ({', '.join(TARGETS)}); default: from the path")
    p.add_argument(
        "--checkpoint", default=None, help="DANN weights (default: checkpoints/p4_dann_<target>.safetensors)"
    )
    add_device_flag(p)
    p.add_argument("--labels", default=None, help="optional image_name,label csv: also print the accuracy on the "
                                                  "images it lists")
    args = p.parse_args(argv)
    t0 = time.time()
    target = resolve_target(args.image_dir, args.target)
    checkpoint = args.checkpoint or default_checkpoint(target)
    out = check_writable_file(args.out_csv)  # writes and removes a probe file: fails now, not after the work
    remove_stale_temps(out.parent if str(out.parent) else ".")  # what a killed earlier run left
    truth = dict(read_label_csv(args.labels)) if args.labels else None  # a bad csv fails before any output
    names, labels, _ = predict_folder(args.image_dir, checkpoint, target, args.device)
    scored = score(names, labels, truth, args.labels) if truth is not None else None
    with all_or_nothing():  # a failed write leaves no temp file and no folder it made
        write_predictions(out, names, labels)
    print(f"wrote {len(names)} predictions ({target}, {Path(checkpoint).name}) to {out} in {time.time() - t0:.1f} s")
    if scored is not None:
        print(f"accuracy on the {scored[1]} images listed in {args.labels}: {100 * scored[0]:.2f}%")


if __name__ == "__main__":
    main()
