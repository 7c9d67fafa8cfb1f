"""Interpolating between two initial noises: linear (lerp) and spherical (slerp).

slerp follows the usual great-circle formula (Shoemake, 1985; used on DDIM latents by Song et al., 2021):
    theta = angle(a, b);  slerp(a, b, alpha) = sin((1-alpha) theta)/sin(theta) a + sin(alpha theta)/sin(theta) b
It is evaluated here in the equivalent rotation form, stable for every angle:
    u = a/|a|,  v = the unit vector of b's component orthogonal to a,  theta = atan2(b.v, b.u)
    slerp = ((1-alpha)|a| + alpha|b|) (cos(alpha theta) u + sin(alpha theta) v)
which equals the formula above when |a| = |b| (as for two draws of high-dimensional Gaussian noise) and
interpolates the norm linearly otherwise. When b is (nearly) parallel to a, sin(alpha theta) ~ 0 and v does
not matter; when b is exactly opposite, any v orthogonal to a gives a half great circle, and a fixed
pseudo-random one is used. Both functions return the endpoints exactly at alpha = 0 and 1. Whole tensors
are treated as single vectors; the arithmetic is float64, the result has a's dtype.
"""
from __future__ import annotations

import math

import torch

_TINY = 1e-12


def _check(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) a + alpha b."""
    alpha = _check(a, b, alpha)
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    return ((1.0 - alpha) * a.double() + alpha * b.double()).to(a.dtype)


def _fixed_orthogonal(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to the unit vector u, the same for the same u (seeded, not random)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        r = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.device)
        r = r - (r @ u) * u
        n = r.norm()
        if n > _TINY:
            return r / n
    raise ValueError("could not find a direction orthogonal to the noise (is it one-dimensional?)")


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation from a (alpha=0) to b (alpha=1); finite for parallel and opposite inputs."""
    alpha = _check(a, b, alpha)
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = x.norm(), y.norm()
    if not (torch.isfinite(na) and torch.isfinite(nb)):
        raise ValueError("slerp needs finite inputs")
    if na <= _TINY or nb <= _TINY:  # no direction to rotate from or to
        return lerp(a, b, alpha)
    u = x / na
    c = y @ u                       # component of b along a
    r = y - c * u                   # component of b orthogonal to a
    s = r.norm()
    theta = torch.atan2(s, c)       # in [0, pi]
    if s > _TINY * nb:
        v = r / s
    else:                           # parallel (theta ~ 0: v unused) or opposite (theta ~ pi: any v)
        v = _fixed_orthogonal(u) if x.numel() > 1 else torch.zeros_like(u)
    radius = (1.0 - alpha) * na + alpha * nb
    out = radius * (torch.cos(alpha * theta) * u + torch.sin(alpha * theta) * v)
    return out.reshape(a.shape).to(a.dtype)


INTERPOLATIONS = {"slerp": slerp, "lerp": lerp}


def interpolate(a: torch.Tensor, b: torch.Tensor, alphas, mode: str = "slerp") -> torch.Tensor:
    """Stack interpolations for each alpha along a new first dimension."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"mode must be one of {', '.join(INTERPOLATIONS)}, got {mode!r}")
    fn = INTERPOLATIONS[mode]
    return torch.stack([fn(a, b, al) for al in alphas])
