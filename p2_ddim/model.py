"""The course's face UNet (the network behind hw2_data/face/UNet.pt), rebuilt so that UNet.pt loads strictly.

Parameter names and shapes follow ../shared/data/dlcv/face_unet_state_dict.txt exactly; the computation
follows ../shared/data/dlcv/face_unet.md:

  time      time.0 sinusoid (stored buffer inv_freq, [sin, cos]), time.1 linear, swish, time.3 linear
  down1     3x3 conv 3 -> C
  down2..18 six resolutions with widths C*(1, 1, 2, 2, 4, 4), two residual blocks each, a stride-2
            conv between resolutions (down4, 7, 10, 13, 16); self-attention at the fifth (down14, 15)
  mid1/2    residual blocks (mid1 with attention)
  up1..23   per resolution, three residual blocks on cat([h, skip]) and a nearest x2 + conv upsample
            (up4, 8, 12, 16, 20); attention at up5..7
  out       GroupNorm, swish, 3x3 conv C -> 3

C = base_channels (128 for the course network, 113.7 M parameters). Small widths (a multiple of 32,
as GroupNorm has 32 groups) are for tests.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import load_into
from common.errors import UserError, one_line

GROUPS = 32
WIDTH_MULTS = (1, 1, 2, 2, 4, 4)
ATTENTION_LEVEL = 4  # the fifth resolution: 16x16 for a 256x256 input
BLOCKS_PER_LEVEL = 2


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-5)


class SinusoidalTime(nn.Module):
    """[sin(t * f_k), cos(t * f_k)] with f_k = exp(-ln(10000) * 2k / dim); f is a stored (persistent) buffer."""

    def __init__(self, dim: int):
        super().__init__()
        k = torch.arange(dim // 2, dtype=torch.float64)
        self.register_buffer("inv_freq", torch.exp(-math.log(10000.0) * 2.0 * k / dim).to(torch.float32))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = t.to(torch.float32)[:, None] * self.inv_freq.to(torch.float32)[None]
        return torch.cat([s.sin(), s.cos()], dim=1)


class ResBlock(nn.Module):
    """conv1(swish(norm1 x)) + per-channel time bias; norm2, swish, dropout, conv2; plus skip(x)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, cout))
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """One-head self-attention over all positions, logits q.k / sqrt(C) (SDPA's default scale), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        # (B, C, H, W) -> (B, 1 head, H*W, C)
        q, k, v = (z.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.out(a)


class Block(nn.Module):
    """A residual block (`resblocks`), optionally followed by self-attention (`attention`)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, attention: bool, dropout: float = 0.0):
        super().__init__()
        self.resblocks = ResBlock(cin, cout, temb_dim, dropout)
        self.attention = SelfAttention(cout) if attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resblocks(x, temb)
        return self.attention(x) if self.attention is not None else x


def downsample(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1))


def upsample(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))


class FaceUNet(nn.Module):
    """eps_theta(x, t) of the course's face DDIM problem; base_channels=128 is the course network."""

    def __init__(self, base_channels: int = 128, dropout: float = 0.0):
        super().__init__()
        if base_channels < GROUPS or base_channels % GROUPS:
            raise ValueError(f"base_channels must be a positive multiple of {GROUPS}, got {base_channels}")
        self.base_channels = base_channels
        c0, temb = base_channels, 4 * base_channels
        self.time = nn.Sequential(SinusoidalTime(c0), nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.down1 = nn.Conv2d(3, c0, 3, padding=1)

        widths = [base_channels * m for m in WIDTH_MULTS]
        last = len(widths) - 1
        skips = [c0]  # channel count of every tensor pushed on the skip stack
        self._down: list[tuple[str, bool]] = []  # (module name, is a residual block)
        ch, n = c0, 2
        for level, width in enumerate(widths):
            for _ in range(BLOCKS_PER_LEVEL):
                self.add_module(f"down{n}", Block(ch, width, temb, level == ATTENTION_LEVEL, dropout))
                self._down.append((f"down{n}", True))
                ch = width
                skips.append(ch)
                n += 1
            if level != last:
                self.add_module(f"down{n}", downsample(ch))
                self._down.append((f"down{n}", False))
                skips.append(ch)
                n += 1

        self.mid1 = Block(ch, ch, temb, True, dropout)
        self.mid2 = Block(ch, ch, temb, False, dropout)

        self._up: list[tuple[str, bool]] = []
        n = 1
        for level in range(last, -1, -1):
            width = widths[level]
            for _ in range(BLOCKS_PER_LEVEL + 1):
                self.add_module(f"up{n}", Block(ch + skips.pop(), width, temb, level == ATTENTION_LEVEL, dropout))
                self._up.append((f"up{n}", True))
                ch = width
                n += 1
            if level != 0:
                self.add_module(f"up{n}", upsample(ch))
                self._up.append((f"up{n}", False))
                n += 1
        assert not skips, "every skip connection is used exactly once"
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        self.downsamplings = last

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        temb = self.time(t)
        h = self.down1(x)
        stack = [h]
        for name, is_block in self._down:
            module = getattr(self, name)
            h = module(h, temb) if is_block else module(h)
            stack.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for name, is_block in self._up:
            module = getattr(self, name)
            h = module(torch.cat([h, stack.pop()], dim=1), temb) if is_block else module(h)
        return self.out(h)


def read_face_unet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) a state dict onto the CPU; one-line UserError for missing/corrupt/other files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: UNet weights not found (expected the course's hw2_data/face/UNet.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here (pickle, zip, EOF, unsupported global)
        if "Unsupported global" in str(e):
            raise UserError(
                f"{path}: holds pickled Python objects, not a plain state dict of tensors (this tool "
                f"does not run pickled code; save model.state_dict() instead): {one_line(e, 120)}"
            ) from None
        raise UserError(f"{path}: not a readable torch state dict (truncated or corrupt?): {one_line(e)}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                          for k, v in obj.items()):
        raise UserError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_face_unet(path: str | os.PathLike, device: torch.device | str = "cpu") -> FaceUNet:
    """Build a FaceUNet of the width the file holds (128 for the course's UNet.pt) and load it strictly."""
    sd = read_face_unet_state_dict(path)
    w = sd.get("down1.weight")
    if w is None or w.dim() != 4 or tuple(w.shape[1:]) != (3, 3, 3) or w.shape[0] < GROUPS or w.shape[0] % GROUPS:
        raise UserError(f"{path}: not the course's face UNet (no down1.weight of shape (C,3,3,3); "
                        f"{len(sd)} tensors, e.g. {sorted(sd)[:2]})")
    model = FaceUNet(base_channels=int(w.shape[0]))
    load_into(model, sd, path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: weights contain NaN or infinity (e.g. {bad[0]})")
    return model.to(device).eval()
