"""Schedules against closed forms, and each sampler step against diffusers' schedulers on the same model output."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.ddim import ddim_step, ddim_timesteps, sample_ddim
from common.schedules import alphas_cumprod, make_betas
from common.seeding import PerSampleNoise
from p1_ddpm.samplers import ddpm_step, dpm_timesteps, guided_eps_fn, sample_dpmpp_2m


def test_linear_schedule_closed_form():
    b = make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b[1:] - b[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)
    ab = alphas_cumprod(b)
    assert ab[10].item() == pytest.approx(math.prod(1 - b[i].item() for i in range(11)), rel=1e-12)


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = alphas_cumprod(make_betas("cosine", T))
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas("cosine", T).max().item() <= 0.999


def test_scaled_linear_and_match_diffusers():
    for kind, dkind in (("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")):
        kw = dict(beta_start=0.00085, beta_end=0.012) if kind == "scaled_linear" else {}
        ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dkind, **kw).betas.double()
        assert torch.allclose(make_betas(kind, 1000), ref, atol=1e-7), kind
    b = make_betas("scaled_linear", 1000)
    assert b[0].item() == pytest.approx(0.00085) and b[-1].item() == pytest.approx(0.012)
    with pytest.raises(ValueError):
        make_betas("quadratic")


def _float64(sched):
    """diffusers keeps its tables in float32; give it our float64 ones so the comparison tests the
    formulas at 1e-6 rather than float32 rounding of 1 - alpha_bar near t = 0."""
    sched.betas = make_betas("linear", 1000)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = alphas_cumprod(sched.betas)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _eps(x, t):
    return 0.3 * torch.tanh(x) + 0.001 * t.float()[:, None, None, None]


def test_ddpm_step_matches_diffusers():
    sched = _float64(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False))
    ab = alphas_cumprod(make_betas("linear")).tolist()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999, 500, 1, 0):
        eps = _eps(x, torch.full((4,), t))
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ours, _ = ddpm_step(x, eps, t, ab, noise)
        assert torch.allclose(ours, ref, atol=1e-6), t


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    sched = _float64(DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                   set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"))
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == ddim_timesteps(1000, 50)
    ab = alphas_cumprod(make_betas("linear")).tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (980, 500, 20, 0):
        eps = _eps(x, torch.full((2,), t))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        prev = t - 20
        ours, _ = ddim_step(x, eps, ab[t], ab[prev] if prev >= 0 else 1.0, eta=eta, noise=noise)
        assert torch.allclose(ours, ref, atol=1e-6), t


def test_full_ddim_trajectory_matches_diffusers():
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(_eps(ref, torch.full((2,), int(t))), t, ref).prev_sample
    ours = sample_ddim(_eps, x, alphas_cumprod(make_betas("linear")), num_steps=10)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_timestep_offset_is_passed_to_the_model():
    seen = []
    sample_ddim(lambda x, t: (seen.append(int(t[0])), torch.zeros_like(x))[1], torch.zeros(1, 1, 2, 2),
                alphas_cumprod(make_betas("linear")), num_steps=5, timestep_offset=1)
    assert seen == [801, 601, 401, 201, 1]


def test_dpmpp_2m_matches_diffusers():
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=2,
                                        algorithm_type="dpmsolver++", final_sigmas_type="zero")
    for steps in (5, 12, 20):
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == dpm_timesteps(1000, steps)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        ref = x.clone()
        for t in sched.timesteps:
            ref = sched.step(_eps(ref, torch.full((2,), int(t))), t, ref).prev_sample
        ours = sample_dpmpp_2m(_eps, x, alphas_cumprod(make_betas("linear")), steps)
        assert torch.allclose(ours, ref, atol=1e-5), steps


class _Affine(torch.nn.Module):
    """eps = a * x + b[cond]: enough to check the guidance arithmetic exactly."""

    def __init__(self):
        super().__init__()
        from p1_ddpm.model import DigitCondition
        self.cond = DigitCondition(4)
        self.config = {"prediction": "eps"}
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return 0.5 * x + cond[:, :1].float()[:, :, None, None]


def test_guidance_arithmetic_one_forward():
    m = _Affine()
    cond = torch.tensor([[3, 1], [7, 0]])
    x = torch.randn(2, 1, 2, 2)
    for w in (0.0, 1.0, 2.5):
        m.calls = 0
        eps = guided_eps_fn(m, cond, w, torch.linspace(0.99, 0.01, 10))(x, torch.zeros(2, dtype=torch.long))
        # uncond branch sees the null digit (10), cond branch the real digit
        expected = 0.5 * x + (10 + w * (cond[:, :1].float() - 10))[:, :, None, None]
        assert torch.allclose(eps, expected, atol=1e-6)
        assert m.calls == 1


def test_per_sample_noise_is_batch_invariant():
    a = PerSampleNoise(5, [0, 1, 2, 3]).randn(3, 4, 4)
    b = torch.cat([PerSampleNoise(5, [0, 1]).randn(3, 4, 4), PerSampleNoise(5, [2, 3]).randn(3, 4, 4)])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, PerSampleNoise(6, [0, 1, 2, 3]).randn(3, 4, 4))


class _VOracle(torch.nn.Module):
    """Outputs the exact v of one fixed x0, as a perfectly trained v network on a one-image data set would."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        from p1_ddpm.model import DigitCondition
        self.cond = DigitCondition(4)
        self.config = {"prediction": "v"}
        self.x0, self.ab = x0.double(), alphas_cumprod.double()

    def forward(self, x, t, cond):
        a = self.ab[t][:, None, None, None]
        x0 = self.x0.repeat(len(x) // len(self.x0), 1, 1, 1)  # guidance doubles the batch
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()


def test_v_prediction_target_and_conversion():
    from common.schedules import eps_from_output, training_target
    ab = alphas_cumprod(make_betas("cosine", 1000))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    for t in (0, 500, 999):
        a = ab[t].float()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = training_target(x0, noise, a, "v")
        assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
        assert torch.allclose(eps_from_output(v, x_t, a, "v"), noise, atol=1e-5)
        assert training_target(x0, noise, a, "eps") is noise and eps_from_output(noise, x_t, a, "eps") is noise


def test_v_network_gives_the_samplers_eps():
    """guided_eps_fn turns a v network's output into eps, with and without guidance (both branches agree
    here), at t = 999 where a = 2.4e-9 too; and a sampler driven by it lands on the oracle's x0."""
    from p1_ddpm.samplers import run_sampler
    ab = alphas_cumprod(make_betas("cosine", 1000))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8, torch.randn(2, 3, 8, 8, generator=g)
    oracle, cond = _VOracle(x0, ab), torch.tensor([[1, 0], [2, 1]])
    for w in (1.0, 3.0):
        eps_fn = guided_eps_fn(oracle, cond, w, ab)
        for t in (999, 500, 0):
            a = ab[t]  # float64: at t = 0, 1 - a = 4e-5 has no digits left in float32
            eps = eps_fn((a.sqrt() * x0 + (1 - a).sqrt() * noise).float(), torch.full((2,), t))
            assert torch.allclose(eps, noise, atol=1e-4), (t, (eps - noise).abs().max())
        start = PerSampleNoise(0, [0, 1])
        out = run_sampler("dpmpp2m", eps_fn, start.randn(3, 8, 8), ab, start, steps=10, clip_x0=1.0)
        assert torch.allclose(out, x0, atol=1e-4), (out - x0).abs().max()
