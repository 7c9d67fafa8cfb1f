"""DDIM (Song et al., 2021): the one implementation shared by P1 (digits) and P2 (the course face UNet).

Conventions, matching diffusers' DDIMScheduler with timestep_spacing="leading" and set_alpha_to_one=True:
  timesteps   step = T // num_steps; t = 0, step, 2*step, ... visited from the largest down to 0
  one step    x0   = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
              sig  = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
              x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sig^2) * eps + sig * z
  ab_prev of the last step is 1 (the clean image).
Coefficients are computed from the float64 alpha-bar table as Python floats; tensors keep their dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm.auto import tqdm


class NoiseSource(Protocol):
    def randn(self, *sample_shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def ddim_timesteps(num_train_steps: int = 1000, num_steps: int = 50) -> list[int]:
    """The visited timesteps, largest first: [..., 2*step, step, 0] with step = T // num_steps."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    step = num_train_steps // num_steps
    return [i * step for i in range(num_steps)][::-1]


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
              eta: float = 0.0, noise: torch.Tensor | None = None,
              clip_x0: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from x_t to x_prev given the predicted noise; returns (x_prev, predicted x0)."""
    a_t, a_prev = float(alpha_bar_t), float(alpha_bar_prev)
    x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    sigma = eta * math.sqrt(max(var, 0.0))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample_ddim(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int = 50,
                eta: float = 0.0, noise: NoiseSource | None = None, clip_x0: float | None = None,
                timestep_offset: int = 0, progress: bool = False,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Run DDIM from x_T to x_0.

    eps_fn(x, t) predicts the noise; it is called with integer timesteps t + timestep_offset (some
    public solutions of the course's face problem call their model with t+1). `noise` supplies the
    fresh noise of each step when eta > 0 (use common.seeding.PerSampleNoise for batch-size
    invariance). `callback(i, t, x_t, x0_pred)` sees every step, e.g. to draw the reverse process.
    """
    if eta > 0 and noise is None:
        raise ValueError("sample_ddim with eta > 0 needs a noise source")
    ab = alphas_cumprod.to(torch.float64).tolist()
    T = len(ab)
    timesteps = ddim_timesteps(T, num_steps)
    step = T // num_steps
    x = x_T
    sample_shape = tuple(x_T.shape[1:])
    for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress, leave=False)):
        t_model = torch.full((x.shape[0],), t + timestep_offset, device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_model).to(x.dtype)
        prev = t - step
        a_prev = ab[prev] if prev >= 0 else 1.0
        z = noise.randn(*sample_shape, dtype=x.dtype).to(x.device) if eta > 0 else None
        x, x0 = ddim_step(x, eps, ab[t], a_prev, eta=eta, noise=z, clip_x0=clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x
