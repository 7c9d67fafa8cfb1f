#!/usr/bin/env python
"""Score generated digits: the accuracy of a classifier on images named by the digit they should show.

    python scripts/evaluate_digits.py --folder OUT --checkpoint Classifier.pth \\
        [--svhn-checkpoint checkpoints/svhn_classifier.safetensors] [--json scores.json]
    python scripts/evaluate_digits.py --folder OUT     # without the course's LeNet: our MNIST-M classifier

OUT is either a folder with subfolders `mnistm/` and `svhn/` (the course's 2024 layout), or a folder
holding the PNGs itself (the flat 2023 layout, all MNIST-M). Every image is 28x28 and named
`{digit}_{index}.png`; its label is the text before the first underscore. Folders whose name
contains "svhn" are scored by SvhnNet (trained on real SVHN by scripts/train_digit_classifier.py),
all others by the course's MNIST-M LeNet (`--checkpoint`, the course's Classifier.pth) or, when it is
not given, by this project's MNIST-M classifier (`--mnistm-checkpoint`, an SvhnNet trained on real
MNIST-M by the same script). Prints a table of the accuracy per folder and which classifier scored it,
and ends with `mean accuracy <value>`, the mean over the folders. `--json` records the same, with
each folder's classifier checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter
from common.datasets import PNG_SUFFIXES, list_images, load_image
from common.errors import UserError, cli_main
from common.fileio import check_writable_file, folder_error, write_text_atomic
from scripts.digit_classifiers import load_course_lenet, load_svhn_net, predict

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SVHN_CHECKPOINT = REPO / "checkpoints" / "svhn_classifier.safetensors"
DEFAULT_MNISTM_CHECKPOINT = REPO / "checkpoints" / "mnistm_classifier.safetensors"


def folder_kind(name: str) -> str | None:
    """'svhn' or 'mnistm' for a subfolder name, None for a folder that is not a digits set."""
    low = name.lower()
    if "svhn" in low:
        return "svhn"
    if "mnistm" in low or "mnist_m" in low or "mnist-m" in low:
        return "mnistm"
    return None


def label_of(path: Path) -> int:
    """The digit before the first underscore of `{digit}_{index}.png`; UserError naming the file otherwise."""
    head, sep, _ = path.stem.partition("_")
    if not sep or not head.isdigit() or not 0 <= int(head) <= 9:
        raise UserError(f"{path}: file name does not start with a digit label 0-9 (expected {{digit}}_{{index}}.png)")
    return int(head)


def find_sets(folder: Path, notes: bool = True) -> list[tuple[str, str, Path]]:
    """(name, kind, path) of every digits set under `folder`: itself when it holds images, else its subfolders."""
    if not folder.is_dir():
        raise folder_error(folder)
    sets, skipped = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        kind = folder_kind(sub.name)
        (sets if kind else skipped).append((sub.name, kind, sub))
    loose = list_images(folder, PNG_SUFFIXES, empty=None)
    if loose and sets:  # which layout is meant cannot be told: scoring one would silently drop the other
        raise UserError(f"{folder}: holds both PNGs ({loose[0].name}, ...) and {sets[0][0]}/; give the folder "
                        f"of one layout: OUT/{{mnistm,svhn}}/*.png (2024, 2025) or OUT/*.png (2023)")
    if loose:
        return [(folder.name or str(folder), folder_kind(folder.name) or "mnistm", folder)]
    for name, _, _ in (skipped if notes else []):
        print(f"note: skipping {folder / name} (not named mnistm or svhn)", file=sys.stderr)
    if not sets:
        raise UserError(f"{folder}: no PNGs in the folder and no mnistm/ or svhn/ subfolder")
    return sets


def score_set(path: Path, model: torch.nn.Module) -> dict:
    """Accuracy of `model` on the images of one folder, with per-digit counts."""
    files = list_images(path, PNG_SUFFIXES, empty="no PNG images in folder")
    labels = np.array([label_of(p) for p in files])
    images = np.stack([load_image(p, size=28) for p in files])
    pred, _ = predict(model, images)
    hit = pred.numpy() == labels
    per_digit = {str(d): {"correct": int(hit[labels == d].sum()), "total": int((labels == d).sum())}
                 for d in range(10) if (labels == d).any()}
    return {"folder": str(path), "correct": int(hit.sum()), "total": len(files),
            "accuracy": float(hit.mean()), "per_digit": per_digit}


def _short(path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (ValueError, OSError):
        return str(path)


def evaluate_folder(folder, lenet: torch.nn.Module | None, svhn_net: torch.nn.Module | None,
                    mnistm_net: torch.nn.Module | None = None, checkpoints: dict | None = None) -> dict:
    """Score OUT (subfolders mnistm/ svhn/, or PNGs directly): {'sets': {name: {...}}, 'mean_accuracy': float}.
    MNIST-M folders go to `lenet` (the course's grader) or, without it, to `mnistm_net` (ours); `checkpoints`
    ({'CourseLeNet': path, 'SvhnNet': path, 'MnistmNet': path}) only labels the results."""
    folder = Path(folder)
    checkpoints = checkpoints or {}
    results = {}
    for name, kind, path in find_sets(folder):
        if kind == "svhn":
            model, classifier = svhn_net, "SvhnNet"
        else:
            model, classifier = (lenet, "CourseLeNet") if lenet is not None else (mnistm_net, "MnistmNet")
        if model is None:
            need = "--svhn-checkpoint (SvhnNet)" if kind == "svhn" else "--checkpoint (the course's Classifier.pth)"
            raise UserError(f"{path}: scoring this folder needs {need}")
        results[name] = {"classifier": classifier, "grader": GRADERS[classifier],
                         "checkpoint": _short(checkpoints.get(classifier)), **score_set(path, model)}
    mean = float(np.mean([r["accuracy"] for r in results.values()]))
    return {"folder": str(folder), "sets": results, "mean_accuracy": mean}


GRADERS = {"CourseLeNet": "the course's MNIST-M LeNet (Classifier.pth)",
           "SvhnNet": "this project's SVHN classifier (trained on real SVHN)",
           "MnistmNet": "this project's MNIST-M classifier (trained on real MNIST-M; not the course's grader)"}


def format_table(report: dict) -> str:
    lines = [f"{'set':<12} {'classifier':<12} {'correct':>8} {'images':>7} {'accuracy':>9}"]
    for name, r in report["sets"].items():
        lines.append(f"{name:<12} {r['classifier']:<12} {r['correct']:>8} {r['total']:>7} {r['accuracy']:>9.4f}")
    lines.append(f"mean accuracy {report['mean_accuracy']:.4f}")
    return "\n".join(lines)


@cli_main(sigterm=True)
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--folder", required=True, help="generated images: OUT/{mnistm,svhn}/*.png or OUT/*.png")
    # --lenet and --svhn-classifier: the names bench_p1.py gives the same two files
    p.add_argument("--checkpoint", "--lenet", dest="checkpoint", default=None,
                   help="the course's MNIST-M classifier (Classifier.pth)")
    p.add_argument("--svhn-checkpoint", "--svhn-classifier", dest="svhn_checkpoint",
                   default=str(DEFAULT_SVHN_CHECKPOINT),
                   help="SvhnNet checkpoint for svhn folders (default: %(default)s)")
    p.add_argument("--mnistm-checkpoint", default=str(DEFAULT_MNISTM_CHECKPOINT),
                   help="this project's MNIST-M classifier, used for mnistm folders when --checkpoint is not given "
                        "(default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.json:
        check_writable_file(args.json)  # fail now, not after the scoring

    sets = find_sets(Path(args.folder), notes=False)  # evaluate_folder lists them again, with notes
    kinds = {kind for _, kind, _ in sets}
    lenet = load_course_lenet(args.checkpoint) if "mnistm" in kinds and args.checkpoint else None
    mnistm_net = load_svhn_net(args.mnistm_checkpoint) if "mnistm" in kinds and not args.checkpoint else None
    svhn_net = load_svhn_net(args.svhn_checkpoint) if "svhn" in kinds else None
    checkpoints = {"CourseLeNet": args.checkpoint, "SvhnNet": args.svhn_checkpoint, "MnistmNet": args.mnistm_checkpoint}
    report = evaluate_folder(args.folder, lenet, svhn_net, mnistm_net, checkpoints)
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
