"""Samplers for the conditional UNet, each with classifier-free guidance in one batched forward per step.

Guidance: eps = eps_uncond + w * (eps_cond - eps_uncond)   (w = 1: conditional only, w = 0: unconditional)
  computed from ONE forward of the concatenated [cond; uncond] batch.

* ancestral DDPM (Ho et al., 2020): all T steps, posterior variance beta_tilde ("fixed_small")
* DDIM (common/ddim.py, shared with P2)
* DPM-Solver++(2M) (Lu et al., 2022): second-order multistep in log-SNR with data prediction;
  the last step returns the predicted x0 (first order), as diffusers' lower_order_final does.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from common.ddim import sample_ddim
from common.device import autocast, wide_float
from common.schedules import eps_from_output
from common.seeding import PerSampleNoise, pad_items, padded_size

SAMPLERS = ("dpmpp2m", "ddim", "ddpm")


def guided_eps_fn(model: torch.nn.Module, cond: torch.Tensor, guidance: float, alphas_cumprod: torch.Tensor,
                  amp_dtype: torch.dtype | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_fn(x, t) for the samplers: one forward of [cond; uncond] and the guidance combination
    (on the network's output: for a v network that is the same as guiding eps, both being affine in it).
    The forward runs under autocast to `amp_dtype` on cond's device (None: exact fp32)."""
    null = model.cond.null_like(cond)
    prediction = model.config.get("prediction", "eps")
    wide = wide_float(cond.device)
    ab_all = alphas_cumprod.to(cond.device, wide)  # once, on the device: no host sync per step

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(cond.device, amp_dtype):
            if guidance == 1.0:
                out = model(x, t, cond).float()
            else:
                out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).float().chunk(2)
                out = out_u + guidance * (out_c - out_u)
        if prediction == "eps":
            return out
        ab = ab_all[t][:, None, None, None]  # float64: 1 - a at t = 999 needs the digits
        return eps_from_output(out.to(wide), x.to(wide), ab, prediction).float()

    return eps_fn


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t: int, alphas_cumprod: list[float],
              noise: torch.Tensor | None, clip_x0: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step t -> t-1 via the predicted x0 and the posterior q(x_{t-1} | x_t, x0)."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t - 1] if t > 0 else 1.0
    beta_t = 1.0 - a_t / a_prev
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = (math.sqrt(a_prev) * beta_t / (1 - a_t)) * x0 + (math.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)) * x_t
    if t > 0:
        var = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        mean = mean + math.sqrt(var) * noise
    return mean, x0


@torch.no_grad()
def sample_ddpm(eps_fn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, noise: PerSampleNoise,
                clip_x0: float | None = None, progress: bool = False, callback=None) -> torch.Tensor:
    ab = alphas_cumprod.to(torch.float64).tolist()
    x = x_T
    shape = tuple(x.shape[1:])
    for i, t in enumerate(tqdm(range(len(ab) - 1, -1, -1), desc="DDPM", disable=not progress, leave=False)):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        z = noise.randn(*shape, dtype=x.dtype).to(x.device) if t > 0 else None
        x, x0 = ddpm_step(x, eps, t, ab, z, clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def dpm_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """num_steps timesteps from T-1 down, evenly spaced in t, excluding 0 (diffusers' 'linspace' spacing)."""
    ts = torch.linspace(0, num_train_steps - 1, num_steps + 1, dtype=torch.float64).round().long().tolist()
    return ts[::-1][:-1]


@torch.no_grad()
def sample_dpmpp_2m(eps_fn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int = 20,
                    clip_x0: float | None = None, progress: bool = False, callback=None) -> torch.Tensor:
    ab = alphas_cumprod.to(torch.float64)
    ts = dpm_timesteps(len(ab), num_steps)
    alpha = [math.sqrt(float(ab[t])) for t in ts]
    sigma = [math.sqrt(1 - float(ab[t])) for t in ts]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    x = x_T
    x0_prev = None
    for i, t in enumerate(tqdm(ts, desc="DPM-Solver++", disable=not progress, leave=False)):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - sigma[i] * eps) / alpha[i]
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if i == len(ts) - 1:  # final step to sigma = 0: the data prediction itself
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x


def run_sampler(name: str, eps_fn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, noise: PerSampleNoise,
                steps: int, eta: float = 0.0, clip_x0: float | None = None, progress: bool = False,
                callback=None) -> torch.Tensor:
    """Dispatch by name; `steps` is ignored by 'ddpm' (always all T steps)."""
    if name == "ddpm":
        return sample_ddpm(eps_fn, x_T, alphas_cumprod, noise, clip_x0, progress, callback)
    if name == "ddim":
        return sample_ddim(eps_fn, x_T, alphas_cumprod, steps, eta=eta, noise=noise, clip_x0=clip_x0,
                           progress=progress, callback=callback)
    if name == "dpmpp2m":
        return sample_dpmpp_2m(eps_fn, x_T, alphas_cumprod, steps, clip_x0, progress, callback)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample_conditional_images(model: torch.nn.Module, cond: torch.Tensor, indices, alphas_cumprod: torch.Tensor,
                              seed: int, sampler: str = "dpmpp2m", steps: int = 12, guidance: float = 3.0,
                              eta: float = 0.0, clip_x0: float | None = 1.0, batch_size: int = 500,
                              device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                              progress: bool = False, callback=None) -> torch.Tensor:
    """P1 (digits and i-CLEVR): guided samples of a class- or multi-label-conditional UNet, one per row of `cond`.

    Images in [-1, 1]; sample k's noise comes from sample_seed(seed, indices[k]), so an image never depends
    on the batch it was drawn in. The UNet runs under autocast to `amp_dtype` (None: exact fp32).
    Returns a float CPU tensor (N, C, H, W)."""
    device = torch.device(device)
    cfg = model.config
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    indices = list(indices)
    outs = []
    pbar = tqdm(total=len(indices), desc=f"sampling ({sampler})", disable=not progress, unit="img")
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        n = len(idx)
        # padded with copies of the last image (dropped) so that the network's batch has a size whose CPU
        # kernels give every image the bits of any other batch size (common.seeding.BATCH_QUANTUM)
        size = padded_size(n, 1 if guidance == 1.0 else 2, device)
        c = pad_items(cond[start:start + batch_size], size).to(device)
        noise = PerSampleNoise(seed, pad_items(idx, size), device)
        x_T = noise.randn(*shape).contiguous(memory_format=torch.channels_last)
        eps_fn = guided_eps_fn(model, c, guidance, alphas_cumprod, amp_dtype)
        step_callback = None if callback is None else (lambda i, t, x, x0, n=n: callback(i, t, x[:n], x0[:n]))
        outs.append(run_sampler(sampler, eps_fn, x_T, alphas_cumprod, noise, steps, eta, clip_x0,
                                callback=step_callback)[:n].float().cpu())
        pbar.update(n)
    pbar.close()
    return torch.cat(outs)
