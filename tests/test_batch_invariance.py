"""Issue 18, audit item 8: on the CPU an image is the same bits whatever --batch-size it is drawn with,
batches of one and three included, in P1 (the conditional UNet's samplers), P5 (textual-inversion generation)
and P3 (ControlNet generation). Before, a batch of one or three ran the networks through other CPU kernels
(matrix products of few rows, convolutions of one image) and moved pixels by one level."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.schedules import alphas_cumprod, make_betas
from tests.tiny_sd import TINY_IMAGE, tiny_sd_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _chunks(fn, n: int, batch_size: int):
    return [fn(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


@pytest.mark.parametrize("sampler,guidance", [("dpmpp2m", 7.0), ("ddim", 1.0)])
def test_p1_images_do_not_depend_on_the_batch_size(tiny_p1_checkpoint, sampler, guidance):
    """16 images (the default batch holds them all), drawn again in batches of 1 and 3: the same floats."""
    from p1_ddpm.model import load_unet
    from p1_ddpm.samplers import sample_conditional_images
    model, _ = load_unet(tiny_p1_checkpoint)
    ab = alphas_cumprod(make_betas("linear"))
    cond = torch.tensor([[d % 10, d % 2] for d in range(16)])
    kw = dict(seed=42, sampler=sampler, steps=3, guidance=guidance, eta=0.5 if sampler == "ddim" else 0.0)
    default = sample_conditional_images(model, cond, range(16), ab, **kw)  # batch_size 500: one batch
    for bs in (1, 3):
        got = sample_conditional_images(model, cond, range(16), ab, batch_size=bs, **kw)
        differing = [i for i in range(16) if not torch.equal(got[i], default[i])]
        assert not differing, f"batch size {bs}: images {differing} differ (max {(got - default).abs().max()})"


def test_p1_callback_sees_only_the_real_images(tiny_p1_checkpoint):
    """The padding of a batch never reaches a caller: the reverse-process callback gets the batch's own images."""
    from p1_ddpm.model import load_unet
    from p1_ddpm.samplers import sample_conditional_images
    model, _ = load_unet(tiny_p1_checkpoint)
    seen = []
    sample_conditional_images(model, torch.tensor([[0, 0]]), [0], alphas_cumprod(make_betas("linear")), 1,
                              steps=2, callback=lambda i, t, x, x0: seen.append((x.shape[0], x0.shape[0])))
    assert seen == [(1, 1), (1, 1)]


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_components(seed=3)


def test_p5_textual_inversion_images_do_not_depend_on_the_batch_size(sd):
    """sample_ti_images (what hw2_ti.sh / infer_ti.py draw with): 8 images of one prompt, default batch 25."""
    from p5_personalization.infer_ti import sample_ti_images
    seeds = [11 * k + 5 for k in range(8)]
    kw = dict(resolution=TINY_IMAGE, steps=3, guidance=7.5)
    default = sample_ti_images(sd, "a photo of a dog", seeds, **kw)
    for bs in (1, 3):
        got = sample_ti_images(sd, "a photo of a dog", seeds, batch_size=bs, **kw)
        differing = [i for i in range(len(seeds)) if not np.array_equal(got[i], default[i])]
        assert not differing, f"batch size {bs}: images {differing} differ"


def test_sd_sampling_and_decoding_floats_do_not_depend_on_the_batch_size(sd):
    """The shared pieces under P3 and P5 (common.stable_diffusion.sample_latents and decode_latents), to the bit."""
    import common.stable_diffusion as sdlib
    n = 8
    shape = (sd.unet.config.in_channels, TINY_IMAGE // sd.vae_scale_factor, TINY_IMAGE // sd.vae_scale_factor)
    cond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [f"a photo of {k} dogs" for k in range(n)])
    uncond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [""]).expand(n, -1, -1)

    def draw(a, b):
        sched = sdlib.make_ddim_scheduler(sd.noise_scheduler)
        lat = sdlib.sample_latents(sd.unet, sched, sdlib.initial_latents(range(a, b), shape, "cpu"), cond[a:b],
                                   uncond[a:b], steps=3, guidance=7.5)
        return lat, sdlib.decode_latents(sd.vae, lat)

    with torch.no_grad():
        lat, img = draw(0, n)
        for bs in (1, 3):
            parts = _chunks(draw, n, bs)
            assert torch.equal(torch.cat([p[0] for p in parts]), lat), bs
            assert torch.equal(torch.cat([p[1] for p in parts]), img), bs


def test_p3_controlnet_images_do_not_depend_on_the_batch_size(sd):
    """sample_controlnet_images (what hw2_3.sh / p3_controlnet/infer.py draw with, default batch 8): 8 control
    images drawn at once and in batches of 1 and 3 give the same floats."""
    import common.stable_diffusion as sdlib
    from p3_controlnet.model import ControlledUNet, build_controlnet, sample_controlnet_images
    torch.manual_seed(0)
    controlnet = build_controlnet(sd.unet, sd.vae_scale_factor)
    with torch.no_grad():  # a trained ControlNet's zero convolutions are not zero: let the control matter
        for p in controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    net = ControlledUNet(sd.unet, controlnet).eval()
    n = 8
    g = torch.Generator().manual_seed(1)
    control = torch.rand(n, 3, TINY_IMAGE, TINY_IMAGE, generator=g)
    cond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [f"a {k} circle" for k in range(n)])
    uncond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [""]).expand(n, -1, -1)

    def draw(a, b):
        sched = sdlib.make_ddim_scheduler(sd.noise_scheduler)
        return sample_controlnet_images(net, sd.vae, sched, cond[a:b], uncond[a:b], control[a:b],
                                        [7 + i for i in range(a, b)], steps=3, guidance=7.5)

    with torch.no_grad():
        default = draw(0, n)
        for bs in (1, 3):
            got = torch.cat(_chunks(draw, n, bs))
            differing = [i for i in range(n) if not torch.equal(got[i], default[i])]
            assert not differing, f"batch size {bs}: images {differing} differ (max {(got - default).abs().max()})"
