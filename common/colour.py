"""sRGB -> CIELAB (D65) in torch, differentiable, and the CIE76 colour difference (delta E).

Used as a training loss (a perceptual colour error for the mini SD's VAE) and as the colour measure of the
judges: delta E 1 is about the smallest difference people notice, a few units a clearly visible one, and
named colours as distinct as red and orange lie about 50 apart.
"""
from __future__ import annotations

import torch

# D65 white in XYZ, the reference white of sRGB
_WHITE = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)


def srgb_to_lab(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """sRGB in [0, 1] (channels along `dim`) -> L*a*b* (L in [0, 100]) along the same dim.

    The cube root is replaced near 0 by CIE's linear segment, so the gradient stays finite at black."""
    rgb = rgb.float().clamp(0, 1).movedim(dim, -1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=linear.dtype, device=linear.device)
    xyz = linear @ m.T / torch.tensor(_WHITE, dtype=linear.dtype, device=linear.device)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    lab = torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return lab.movedim(-1, dim)


def delta_e(a: torch.Tensor, b: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """CIE76 delta E between two sRGB tensors in [0, 1] (channels along `dim`); that dim is reduced."""
    return (srgb_to_lab(a, dim) - srgb_to_lab(b, dim)).norm(dim=dim)


def rgb255_to_lab(rgb) -> torch.Tensor:
    """(..., 3) 0-255 RGB values (a tuple, list or array) -> (..., 3) L*a*b*."""
    return srgb_to_lab(torch.as_tensor(rgb, dtype=torch.float32) / 255.0, dim=-1)
