"""Batched training-time augmentation of digit images, on float tensors (B,3,H,W) in [0, 255].

Everything is drawn from one torch.Generator, so a seeded run augments the same way every time.
  random_affine   rotation, scale, shear, shift (per image, one grid_sample for the batch)
  colour_jitter   inversion, channel shuffle, grey, brightness/contrast (per image)
  colourize_grey  paints a grey digit on a random colour-noise texture, half the time as MNIST-M was
                  made (|texture - digit|), half as a coloured digit on it: a grey source then looks
                  like a colour target without using any target image.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    affine: float = 1.0        # strength of the geometric augmentation (0 = none)
    scale_min: float = 0.85    # range of the random zoom (at affine = 1; > 1 enlarges the digit)
    scale_max: float = 1.2
    invert: float = 0.0        # probability of inverting an image
    channel_shuffle: float = 0.0  # probability of permuting the colour channels
    grey: float = 0.0          # probability of turning an image grey
    jitter: float = 0.0        # brightness/contrast jitter amplitude (0.3 = +-30%)
    colourize: float = 0.0     # probability of colourize_grey (for grey sources)

    def as_dict(self) -> dict:
        return asdict(self)

    def is_identity(self) -> bool:
        return all(v == 0 for k, v in asdict(self).items() if not k.startswith("scale_"))


def _uniform(gen: torch.Generator | None, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _chance(gen: torch.Generator | None, p: float, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def random_affine(x: torch.Tensor, gen: torch.Generator | None, strength: float = 1.0,
                  scale: tuple[float, float] = (0.85, 1.2)) -> torch.Tensor:
    """Rotation +-15 deg, zoom in `scale`, shear +-10 deg, shift +-10% (times `strength`); border padding."""
    if strength <= 0:
        return x
    b = x.shape[0]
    angle = _uniform(gen, -15, 15, b) * strength * math.pi / 180
    shear = _uniform(gen, -10, 10, b) * strength * math.pi / 180
    log_scale = _uniform(gen, math.log(scale[0]), math.log(scale[1]), b) * strength
    shift = _uniform(gen, -0.2, 0.2, b, 2) * strength  # grid units: 2 = the whole image
    cos, sin, inv_s = torch.cos(angle), torch.sin(angle), torch.exp(-log_scale)
    # theta maps output to input coordinates: (rotation @ shear-along-x) / scale, so scale > 1 enlarges
    t = torch.tan(shear)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * inv_s
    theta[:, 0, 1] = (cos * t - sin) * inv_s
    theta[:, 1, 0] = sin * inv_s
    theta[:, 1, 1] = (sin * t + cos) * inv_s
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, gen: torch.Generator | None, cfg: AugmentConfig) -> torch.Tensor:
    b = x.shape[0]
    if cfg.channel_shuffle > 0:
        perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(b)])
        shuffled = torch.gather(x, 1, perms[:, :, None, None].expand_as(x).to(x.device))
        x = torch.where(_chance(gen, cfg.channel_shuffle, b)[:, None, None, None].to(x.device), shuffled, x)
    if cfg.grey > 0:
        grey = x.mean(dim=1, keepdim=True).expand_as(x)
        x = torch.where(_chance(gen, cfg.grey, b)[:, None, None, None].to(x.device), grey, x)
    if cfg.jitter > 0:
        contrast = _uniform(gen, 1 - cfg.jitter, 1 + cfg.jitter, b, 1, 1, 1).to(x.device)
        brightness = _uniform(gen, -cfg.jitter, cfg.jitter, b, 1, 1, 1).to(x.device) * 255
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp(0, 255)
    if cfg.invert > 0:
        x = torch.where(_chance(gen, cfg.invert, b)[:, None, None, None].to(x.device), 255 - x, x)
    return x


def noise_texture(b: int, size: int, gen: torch.Generator | None) -> torch.Tensor:
    """Random colour textures (B,3,size,size) in [0, 255], loosely like photo patches: a muted base colour,
    mostly-luminance noise at scales from half the image down to single pixels."""
    base = _uniform(gen, 0, 1, b, 3, 1, 1)
    grey = base.mean(dim=1, keepdim=True)
    tex = (grey + _uniform(gen, 0, 1, b, 1, 1, 1) * (base - grey)).expand(b, 3, size, size).clone()
    chroma = _uniform(gen, 0, 0.6, b, 1, 1, 1)
    for cells in (2, 4, 7, 14, 28):
        amp = _uniform(gen, 0, 0.3, b, 1, 1, 1) * (cells / 2) ** -0.4
        noise = torch.randn(b, 1, cells, cells, generator=gen) + chroma * torch.randn(b, 3, cells, cells, generator=gen)
        tex += amp * F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return tex.clamp(0, 1) * 255


def colourize_grey(x: torch.Tensor, gen: torch.Generator | None, p: float) -> torch.Tensor:
    """With probability p per image: the grey digit (its mean over channels) painted on a random texture."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    digit = x.mean(dim=1, keepdim=True) / 255
    tex = noise_texture(b, h, gen).to(x.device, x.dtype)
    blended = (tex - 255 * digit).abs()  # how MNIST-M was made from MNIST and photo patches
    fg = (_uniform(gen, 0, 1, b, 3, 1, 1) * 255).to(x.device, x.dtype)
    painted = tex * (1 - digit) + fg * digit
    use_blend = _chance(gen, 0.5, b)[:, None, None, None].to(x.device)
    coloured = torch.where(use_blend, blended, painted)
    return torch.where(_chance(gen, p, b)[:, None, None, None].to(x.device), coloured, x)


def augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 or float (B,3,H,W) 0-255 -> augmented float (B,3,H,W) 0-255."""
    x = images.float()
    if cfg.is_identity():
        return x
    x = colourize_grey(x, gen, cfg.colourize)
    x = colour_jitter(x, gen, cfg)
    return random_affine(x, gen, cfg.affine, (cfg.scale_min, cfg.scale_max))
