"""The i-CLEVR judges and the lab's accuracy: P1's training scores its validation samples with them and
scripts/evaluate_iclevr.py grades generated folders.

  lab  the lab's evaluator architecture: torchvision resnet18 whose fc is Linear(512, 24) + sigmoid,
       weights under the key 'model' of a local checkpoint.pth (nothing is downloaded);
       inputs in [-1, 1] (normalised with mean 0.5, std 0.5), 64x64.
  own  this project's multi-label CNN trained on rendered images (scripts/train_iclevr_judge.py;
       weights shipped in checkpoints/iclevr_judge.safetensors).
Accuracy (the lab's definition): for each image with k true objects, count how many of the judge's
top-k classes are true; sum over images and divide by the sum of k.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import load_into, read_checkpoint
from common.errors import UserError, one_line
from common.paths import ASSETS, CHECKPOINTS

OWN_JUDGE = CHECKPOINTS / "iclevr_judge.safetensors"
DEFAULT_OBJECTS = ASSETS / "iclevr" / "objects.json"
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
        raise UserError(f"{path}: not a readable torch checkpoint ({one_line(e)})") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise UserError(f"{path}: expected a dict with the evaluator's weights under the key 'model'")
    net = lab_evaluator()
    try:
        net.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the lab's resnet18 evaluator: {one_line(e)}") from None
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
