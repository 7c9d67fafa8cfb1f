"""Noise schedules (betas) and their cumulative products, computed in float64.

The formulas are the standard ones:
  linear        betas = linspace(beta_start, beta_end, T)                     (Ho et al., 2020)
  cosine        alpha_bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2), s=0.008,
                betas = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at max_beta     (Nichol & Dhariwal, 2021;
                diffusers calls it squaredcos_cap_v2)
  scaled_linear betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (Stable Diffusion, 0.00085..0.012)
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "scaled_linear")
# what a diffusion network outputs: the noise (Ho et al., 2020) or v = sqrt(a) eps - sqrt(1-a) x0 (Salimans &
# Ho, 2022), a = alpha_bar_t; P1 trains either, SD v1 is eps (diffusers: prediction_type epsilon / v_prediction)
PREDICTIONS = ("eps", "v")


def make_betas(kind: str = "linear", num_steps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None, cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Return the (num_steps,) float64 betas of a named schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        b0 = 1e-4 if beta_start is None else beta_start
        b1 = 0.02 if beta_end is None else beta_end
        return torch.linspace(b0, b1, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        b0 = 0.00085 if beta_start is None else beta_start
        b1 = 0.012 if beta_end is None else beta_end
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                 for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network is trained to output for x_t = sqrt(a) x0 + sqrt(1-a) noise (alpha_bar broadcastable)."""
    if prediction == "eps":
        return noise
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def eps_from_output(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The noise implied by the network's output (eps: itself; v: sqrt(a) v + sqrt(1-a) x_t)."""
    if prediction == "eps":
        return out
    return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x_t
