"""Digit classifiers that score generated 28x28 RGB digits.

* CourseLeNet: the course's MNIST-M grader (`Classifier.pth`), rebuilt layer for layer so its
  weights load strictly. Input: RGB in [0, 1] normalised with mean 0.5, std 0.5 per channel.
* SvhnNet: a small conv-BN-ReLU network trained by scripts/train_digit_classifier.py on the real
  SVHN images (the course grades SVHN-style digits with a hub model that cannot run here). The same
  network, trained on real MNIST-M (`--dataset mnistm`), is this project's MNIST-M classifier
  (checkpoints/mnistm_classifier.safetensors), which scores MNIST-M digits when the course's LeNet
  is not at hand. Input:
  each image standardised on its own (zero mean, unit std over all its pixels), which takes away
  most of SVHN's brightness and contrast variation.

Both models carry a `preprocess(uint8 NCHW tensor) -> float tensor` method, so `predict` feeds
every model the input it was trained on.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from common.checkpoint import load_into, read_checkpoint, save_checkpoint
from common.errors import UserError, one_line

SVHN_KIND = "scripts.SvhnNet"
IMAGE_SIZE = 28


class CourseLeNet(nn.Module):
    """The course's LeNet: conv1 3->6 5x5, pool, conv2 6->16 5x5, pool, fc 256->128->64->10, ReLU between."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,28,28) -> float normalised with mean 0.5, std 0.5 (the course's transform)."""
        return (images.float() / 255.0 - 0.5) / 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_course_lenet(path: str | os.PathLike, device: torch.device | str = "cpu") -> CourseLeNet:
    """Load `Classifier.pth` ({'state_dict': ...} or a bare state dict); UserError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: classifier checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError,
            AttributeError, TypeError, KeyError, IndexError, SafetensorError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format?): "
                        f"{one_line(e, 100)}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict (or a dict with key 'state_dict') of the course's LeNet")
    model = CourseLeNet()
    load_into(model, state, path)
    return model.to(device).eval()


class SvhnNet(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU layers (28 -> 14 -> 7 -> 3 by max-pooling), global pool, dropout, linear."""

    def __init__(self, widths: tuple[int, ...] | list[int] = (32, 64, 128), dropout: float = 0.3,
                 num_classes: int = 10):
        super().__init__()
        self.config = {"widths": [int(w) for w in widths], "dropout": float(dropout), "num_classes": int(num_classes)}
        layers: list[nn.Module] = []
        in_ch = 3
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                in_ch = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, num_classes)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) -> float, each image standardised over all its pixels and channels."""
        x = images.float() / 255.0
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self.head(self.dropout(h))


def save_svhn_net(path: str | os.PathLike, model: SvhnNet, train_config: dict[str, Any] | None = None,
                  metrics: dict[str, Any] | None = None, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write an SvhnNet as a safetensors checkpoint of kind `scripts.SvhnNet` (+ JSON sidecar)."""
    config = {"model": model.config, "train": train_config or {}}
    return save_checkpoint(path, model.state_dict(), SVHN_KIND, config, metrics, dtype=dtype)


def load_svhn_net(path: str | os.PathLike, device: torch.device | str = "cpu") -> SvhnNet:
    """Rebuild an SvhnNet from its checkpoint; UserError naming the file on any mismatch."""
    state, config = read_checkpoint(path, SVHN_KIND)
    try:
        model = SvhnNet(**config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: checkpoint config does not describe an SvhnNet ({e})") from None
    load_into(model, state, path)
    return model.to(device).eval()


def as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images as a (B,3,H,W) tensor: accepts NHWC or NCHW, numpy or torch, 1 or 3 channels."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"predict wants uint8 images, got {x.dtype}")
    if x.ndim == 3:  # (B,H,W) grey
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"predict wants a batch of images (B,H,W,C) or (B,C,H,W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify uint8 images (NHWC or NCHW); returns (labels LongTensor (B,), probabilities (B, 10))."""
    x = as_nchw_uint8(images)
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {tuple(x.shape[-2:])}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(x), batch_size):
        batch = model.preprocess(x[start:start + batch_size].to(device))
        probs.append(F.softmax(model(batch).float(), dim=1).cpu())
    model.train(was_training)
    p = torch.cat(probs) if probs else torch.zeros(0, 10)
    return p.argmax(dim=1), p
