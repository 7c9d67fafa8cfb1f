"""DANN (Ganin et al., 2016): a CNN feature extractor, a digit classifier, and a domain classifier that
sees the features through a gradient-reversal layer.

BatchNorm: by default (num_domains=1) one set of statistics, shared by source and target, which go
through the network together in one batch, as in the DANN paper. With num_domains=2 every BatchNorm
layer of the feature extractor keeps one set of running statistics per domain (0 = source, 1 =
target; affine weights shared) and each domain is normalised with its own (domain-specific BN, a
`train.py --bn domain` option). `eval_domain` in a checkpoint's config says which statistics predict
the target: a source-only model never sees the target and always predicts with the source's.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_into, read_checkpoint, save_checkpoint
from common.errors import UserError

CHECKPOINT_KIND = "p4_dann.DANN"
NUM_CLASSES = 10
SOURCE, TARGET = 0, 1


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity in the forward pass; the backward pass multiplies the gradient by -coeff."""
    return _ReverseGrad.apply(x, coeff)


class GradientReversal(nn.Module):
    """The gradient-reversal layer; `coeff` is set from outside as training progresses."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = coeff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.coeff)


def grl_coefficient(progress: float, gamma: float = 10.0) -> float:
    """The DANN paper's adaptation factor 2 / (1 + exp(-gamma p)) - 1: 0 at p = 0, -> 1 as p -> 1."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def dann_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """The DANN paper's learning-rate annealing 1 / (1 + alpha p)^beta (multiplies the initial rate)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 / (1.0 + alpha * p) ** beta


class DomainBatchNorm(nn.Module):
    """BatchNorm (1d or 2d) with one set of running statistics per domain and shared affine weights.

    The domain is an attribute (`set_domain`), so the layer fits into nn.Sequential."""

    def __init__(self, channels: int, num_domains: int = 2, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_domains, self.momentum, self.eps = num_domains, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(num_domains, channels))
        self.register_buffer("running_var", torch.ones(num_domains, channels))
        self.domain = SOURCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # indexing a row gives a view, so batch_norm updates that domain's statistics in place
        return F.batch_norm(x, self.running_mean[self.domain], self.running_var[self.domain], self.weight,
                            self.bias, self.training, self.momentum, self.eps)


def _conv_block(cin: int, cout: int, kernel: int, num_domains: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), DomainBatchNorm(cout, num_domains),
            nn.ReLU(inplace=True)]


class DANN(nn.Module):
    """Feature extractor (three conv-BN-ReLU stages, 28 -> 14 -> 7 -> 3, then a linear layer), digit and domain heads.

    Input: float images (B,3,28,28), already preprocessed (see `preprocess`)."""

    def __init__(self, widths=(32, 64, 128), feature_dim: int = 256, dropout: float = 0.3, domain_hidden: int = 256,
                 num_domains: int = 1, input_norm: str = "image"):
        super().__init__()
        if input_norm not in ("image", "fixed"):
            raise ValueError(f"input_norm must be 'image' or 'fixed', got {input_norm!r}")
        widths = [int(w) for w in widths]
        self.config: dict[str, Any] = {"widths": widths, "feature_dim": int(feature_dim), "dropout": float(dropout),
                                       "domain_hidden": int(domain_hidden), "num_domains": int(num_domains),
                                       "input_norm": input_norm}
        w1, w2, w3 = widths
        # flattened 3x3 maps rather than global pooling: where the strokes are is what tells digits apart
        self.features = nn.Sequential(
            *_conv_block(3, w1, 5, num_domains),
            nn.MaxPool2d(2),
            *_conv_block(w1, w2, 5, num_domains),
            nn.MaxPool2d(2),
            nn.Dropout2d(dropout / 2),
            *_conv_block(w2, w3, 3, num_domains),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(w3 * 9, feature_dim, bias=False),
            DomainBatchNorm(feature_dim, num_domains),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = feature_dim
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))
        self.grl = GradientReversal(0.0)
        self.discriminator = nn.Sequential(nn.Linear(feature_dim, domain_hidden), nn.ReLU(inplace=True),
                                           nn.Dropout(dropout), nn.Linear(domain_hidden, domain_hidden),
                                           nn.ReLU(inplace=True), nn.Linear(domain_hidden, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0-255) (B,3,H,W) -> network input.

        'image': each image standardised over its own pixels and channels, which removes the brightness
        and contrast differences between domains; 'fixed': (x/255 - 0.5) / 0.5."""
        x = images.float() / 255.0
        if self.config["input_norm"] == "fixed":
            return (x - 0.5) / 0.5
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 0.05)

    def set_domain(self, domain: int) -> None:
        if not 0 <= domain < self.config["num_domains"]:
            raise ValueError(f"domain {domain} out of range")
        for m in self.features.modules():
            if isinstance(m, DomainBatchNorm):
                m.domain = domain

    def extract(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        self.set_domain(domain)
        return self.features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def domain_logits(self, features: torch.Tensor, coeff: float) -> torch.Tensor:
        """Domain logit (target = 1) of features seen through the reversal layer with coefficient `coeff`."""
        self.grl.coeff = coeff
        return self.discriminator(self.grl(features)).squeeze(1)

    def forward(self, x: torch.Tensor, domain: int = TARGET) -> torch.Tensor:
        return self.classify(self.extract(x, domain))


def save_dann(path: str | os.PathLike, model: DANN, eval_domain: int, info: dict[str, Any],
              metrics: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """A DANN checkpoint: weights + {'model': config, 'eval_domain': ..., **info} (source, target, mode...)."""
    config = {"model": model.config, "eval_domain": int(eval_domain), **info}
    return save_checkpoint(path, model.state_dict(), CHECKPOINT_KIND, config, metrics, dtype=dtype)


def load_dann(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[DANN, dict[str, Any]]:
    """Rebuild a DANN from its checkpoint (in eval mode, BatchNorm set to `eval_domain`); UserError naming the
    file when it is not one."""
    state, config = read_checkpoint(path, CHECKPOINT_KIND)
    try:
        model = DANN(**config["model"])
        eval_domain = int(config["eval_domain"])
        model.set_domain(eval_domain)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: checkpoint config does not describe a DANN model ({e})") from None
    load_into(model, state, path)
    return model.to(device).eval(), config


@torch.no_grad()
def predict_logits(model: DANN, images: torch.Tensor, domain: int, batch_size: int = 512,
                   return_features: bool = False):
    """Logits (and optionally features) of uint8 images (B,3,28,28), in eval mode, in batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        x = model.preprocess(images[start:start + batch_size].to(device))
        f = model.extract(x, domain)
        logits.append(model.classify(f).float().cpu())
        if return_features:
            feats.append(f.float().cpu())
    model.train(was_training)
    out = torch.cat(logits) if logits else torch.zeros(0, NUM_CLASSES)
    if return_features:
        return out, (torch.cat(feats) if feats else torch.zeros(0, model.feature_dim))
    return out
