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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.checkpoint import load_into, read_checkpoint  # noqa: E402
from common.errors import UserError, cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OWN_JUDGE = REPO / "checkpoints" / "iclevr_judge.safetensors"
DEFAULT_OBJECTS = REPO / "assets" / "iclevr" / "objects.json"
JUDGE_KIND = "iclevr.MultiLabelJudge"
NUM_CLASSES = 24


def topk_accuracy(scores: torch.Tensor, multi_hot: torch.Tensor) -> tuple[int, int]:
    """(hits, total): for each row with k ones in multi_hot, how many of the k highest scores are ones."""
    hits = total = 0
    for s, y in zip(scores, multi_hot):
        k = int(y.sum().item())
        if k == 0:
            continue
        top = s.topk(k).indices
        hits += int(y[top].gt(0).sum().item())
        total += k
    return hits, total


def lab_evaluator() -> nn.Module:
    """The lab's evaluator network (untrained): resnet18 with fc = Linear(512, 24) + Sigmoid."""
    from torchvision.models import resnet18
    net = resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, NUM_CLASSES), nn.Sigmoid())
    return net


def load_lab_evaluator(path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: evaluator checkpoint not found (the lab's checkpoint.pth)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise UserError(f"{path}: expected a dict with the evaluator's weights under the key 'model'")
    net = lab_evaluator()
    try:
        net.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the lab's resnet18 evaluator: {str(e).splitlines()[0]}") from None
    return net.eval()


class MultiLabelJudge(nn.Module):
    """A small conv net: 64x64 in [-1, 1] -> 24 logits. Global max pooling keeps 'is there a red cube
    anywhere', which is what a multi-label scene needs."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = dict(width=width, num_classes=num_classes)

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(3, w, 2), *block(w, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
                                      *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


def load_own_judge(path: str | Path = OWN_JUDGE) -> nn.Module:
    state, config = read_checkpoint(path, JUDGE_KIND)
    net = MultiLabelJudge(**config["model"])
    load_into(net, state, path)
    return net.eval()


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float in [-1, 1] (mean 0.5, std 0.5), resized to 64x64 when needed."""
    x = images_uint8.float() / 127.5 - 1.0
    if x.shape[-1] != 64 or x.shape[-2] != 64:
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def judge_scores(net: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([net(to_input(images_uint8[i:i + batch_size])).float()
                      for i in range(0, len(images_uint8), batch_size)])


def read_images(path: Path, count: int) -> torch.Tensor:
    """`count` images from a folder of 0.png..N-1.png, or the tiles of a grid PNG (64x64, 2-px padding)."""
    from PIL import Image
    if path.is_dir():
        imgs = []
        for i in range(count):
            f = path / f"{i}.png"
            if not f.is_file():
                raise UserError(f"{f}: image missing (expected {count} images 0.png..{count - 1}.png, one per label list)")
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC)))
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    if not path.is_file():
        raise UserError(f"{path}: no such image folder or grid file")
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    tile, pad = 64, 2
    cols = (grid.shape[1] - pad) // (tile + pad)
    rows = (grid.shape[0] - pad) // (tile + pad)
    if rows * cols < count:
        raise UserError(f"{path}: a grid of {rows}x{cols} 64-px tiles holds fewer than {count} images")
    tiles = [grid[pad + r * (tile + pad): pad + r * (tile + pad) + tile, pad + c * (tile + pad): pad + c * (tile + pad) + tile]
             for r in range(rows) for c in range(cols)][:count]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of 0.png..N-1.png (or a grid PNG)")
    p.add_argument("--labels", required=True, help="the label lists (test.json / new_test.json style)")
    p.add_argument("--objects", default=str(DEFAULT_OBJECTS), help="objects.json (name -> index)")
    p.add_argument("--judge", choices=("lab", "own"), default="lab", help="lab: resnet18 evaluator; own: shipped CNN")
    p.add_argument("--checkpoint", default=None,
                   help="judge weights: the lab's checkpoint.pth (required for --judge lab); "
                        "default for --judge own: checkpoints/iclevr_judge.safetensors")
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
    return acc


if __name__ == "__main__":
    main()
