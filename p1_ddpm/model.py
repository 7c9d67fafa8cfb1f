"""A compact conditional UNet that predicts the noise in x_t (or v) from (x_t, t, condition).

Conditioning is added to the time embedding and enters every residual block as a GroupNorm
scale/shift (the "AdaGN" of Dhariwal & Nichol, 2021). Two condition encoders:

* DigitCondition: a LongTensor (B, 2) of [digit 0-9, dataset 0-1]; digit 10 / dataset 2 mean
  "no condition" (learned embeddings), used for classifier-free guidance.
* MultiHotCondition: a float (B, K) multi-hot vector; the all-zero vector means "no condition"
  (every real label list has at least one object).

What the network predicts (config "prediction"):

* "eps": the noise (Ho et al., 2020); the P1 digits default.
* "v": v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho, 2022), a = alpha_bar_t. Where the signal is
  nearly gone (cosine schedule: a = 2.4e-9 at t = 999), an eps network's x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
  multiplies its error by 1 / sqrt(a), and the eps loss barely weighs x0 there, so the layout and colours
  decided at those steps are poorly learnt; v keeps x0's weight near 1 at every t. The samplers take eps,
  so `common.schedules.eps_from_output` converts.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_into, read_checkpoint
from common.errors import UserError
from common.schedules import PREDICTIONS, alphas_cumprod, make_betas

CHECKPOINT_KIND = "p1_ddpm.ConditionalUNet"
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer/float timesteps, (B,) -> (B, dim): [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch // 4) or 1, ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stabler early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # fused kernels on CUDA (flash / mem-efficient)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DigitCondition(nn.Module):
    """[digit, dataset] -> embedding; index num_classes / num_domains is the learned 'no condition'."""

    def __init__(self, dim: int, num_classes: int = 10, num_domains: int = 2):
        super().__init__()
        self.num_classes, self.num_domains = num_classes, num_domains
        self.digit = nn.Embedding(num_classes + 1, dim)
        self.domain = nn.Embedding(num_domains + 1, dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.digit(cond[:, 0]) + self.domain(cond[:, 1])

    def drop(self, cond: torch.Tensor, drop_label: torch.Tensor, drop_domain: torch.Tensor) -> torch.Tensor:
        cond = cond.clone()
        cond[drop_label, 0] = self.num_classes
        cond[drop_domain, 1] = self.num_domains
        return cond

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        """The guidance 'unconditional' input: digit dropped, dataset kept, so guidance sharpens the digit
        while both branches agree on the dataset's style."""
        out = cond.clone()
        out[:, 0] = self.num_classes
        return out


class MultiHotCondition(nn.Module):
    """Multi-hot (B, K) -> embedding; the zero vector is the 'no condition' input."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.proj = nn.Linear(num_labels, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        is_null = (cond.sum(dim=1, keepdim=True) == 0).to(self.null.dtype)
        return self.proj(cond.to(self.proj.weight.dtype)) + is_null * self.null

    def drop(self, cond: torch.Tensor, drop_label: torch.Tensor, drop_domain: torch.Tensor) -> torch.Tensor:
        return cond * (~drop_label).to(cond.dtype)[:, None]

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)


class ConditionalUNet(nn.Module):
    def __init__(self, image_size: int = 28, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128),
                 num_res_blocks: int = 2, attention_levels: tuple[int, ...] = (2,), dropout: float = 0.1,
                 condition: str = "digits", num_classes: int = 10, num_domains: int = 2, num_labels: int = 24,
                 patch_size: int = 1, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.config = dict(
            image_size=image_size,
            in_channels=in_channels,
            channels=list(channels),
            patch_size=patch_size,
            num_res_blocks=num_res_blocks,
            attention_levels=list(attention_levels),
            dropout=dropout,
            condition=condition,
            num_classes=num_classes,
            num_domains=num_domains,
            num_labels=num_labels,
            prediction=prediction,
        )
        ch0 = channels[0]
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if condition == "digits":
            self.cond = DigitCondition(emb_dim, num_classes, num_domains)
        elif condition == "multihot":
            self.cond = MultiHotCondition(emb_dim, num_labels)
        else:
            raise ValueError(f"unknown condition {condition!r}")

        # patch_size 2 folds each 2x2 pixel block into channels (lossless), so the network runs at half
        # resolution: 4x fewer FLOPs at the widest level, which is what makes CPU sampling fast.
        self.patch_size = patch_size
        self.stem = nn.Conv2d(in_channels * patch_size ** 2, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [ch0]
        ch = ch0
        for level, mult_ch in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks = nn.ModuleList([ResBlock(ch, mult_ch, emb_dim, dropout)])
                ch = mult_ch
                if level in attention_levels:
                    blocks.append(SelfAttention(ch))
                self.down.append(blocks)
                skip_chs.append(ch)
            if level != len(channels) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_chs.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult_ch in reversed(list(enumerate(channels))):
            for i in range(num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(ch + skip_chs.pop(), mult_ch, emb_dim, dropout)])
                ch = mult_ch
                if level in attention_levels:
                    blocks.append(SelfAttention(ch))
                if level != 0 and i == num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(blocks)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels * patch_size ** 2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config["channels"][0])) + self.cond(cond)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.stem(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h)
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


def schedule_of(config: dict) -> torch.Tensor:
    """alpha_bar_t of the noise schedule a checkpoint was trained with (its config's schedule and step count)."""
    return alphas_cumprod(make_betas(config["schedule"], config["num_train_steps"]))


def load_unet(path: str | Path, device: torch.device | str = "cpu") -> tuple[ConditionalUNet, dict]:
    """Build a ConditionalUNet from a checkpoint written by p1_ddpm/train.py; returns (model, full config)."""
    state, config = read_checkpoint(path, CHECKPOINT_KIND)
    try:
        model = ConditionalUNet(**config["model"])  # files from before "prediction" existed predict eps
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model config: {e}") from None
    load_into(model, state, path)
    # channels_last: faster convolutions with oneDNN on CPU (~15% here) and with cuDNN on GPU
    return model.to(device, memory_format=torch.channels_last).eval(), config
