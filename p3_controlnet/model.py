"""ControlNet (Zhang et al., 2023) on a frozen Stable Diffusion v1 UNet.

The ControlNet is diffusers' `ControlNetModel`, initialised from the SD UNet with `from_unet`: a
trainable copy of the UNet's encoder and middle block, fed the control image through a small
conditioning encoder, whose outputs reach the frozen UNet's skip connections through zero-initialised
1x1 convolutions. At initialisation those convolutions output zeros, so SD's prediction is unchanged.

A trained ControlNet is stored as a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`),
which diffusers' own ControlNet pipelines also read.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from common.device import autocast
from common.errors import UserError, one_line
from common.fileio import share_tree
from common.seeding import pad_items, padded_size

# the conditioning encoder's widths in SD v1 ControlNets: three stride-2 convs take 512 px to 64 latents
COND_EMBED_CHANNELS = (16, 32, 96, 256)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONTROLNET = REPO / "checkpoints" / "controlnet"


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Conditioning-encoder widths whose down-sampling (2^(len-1)) equals the VAE's."""
    n_down = int(round(math.log2(vae_scale_factor)))
    if 2 ** n_down != vae_scale_factor or not 0 <= n_down < len(COND_EMBED_CHANNELS):
        raise ValueError(f"unsupported VAE scale factor {vae_scale_factor}")
    return COND_EMBED_CHANNELS[: n_down + 1]


def build_controlnet(unet, vae_scale_factor: int = 8):
    """A ControlNet copied from `unet` (fp32, trainable, zero convolutions at zero)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels_for(vae_scale_factor)
    )
    from common.stable_diffusion import cast
    return cast(net, torch.float32).train()


def use_sdpa(*models) -> None:
    """PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA) in every attention layer."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    for m in models:
        m.set_attn_processor(AttnProcessor2_0())


class ControlledUNet(torch.nn.Module):
    """eps(x_t, t, context, control) = UNet(x_t, t, context, + ControlNet(x_t, t, context, control) residuals)."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def residuals(self, x: torch.Tensor, t, context: torch.Tensor, control: torch.Tensor, scale: float = 1.0) -> dict:
        down, mid = self.controlnet(x, t, encoder_hidden_states=context, controlnet_cond=control,
                                    conditioning_scale=scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def forward(
        self, x: torch.Tensor, t, context: torch.Tensor, control: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context, **self.residuals(x, t, context, control, scale)).sample


def check_compatible(controlnet, unet, source: str) -> None:
    """The ControlNet must have been made from a UNet of the same shape as the one it now steers."""
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "in_channels")
    diff = [k for k in keys if list(_as_list(controlnet.config.get(k))) != list(_as_list(unet.config.get(k)))]
    if diff:
        k = diff[0]
        raise UserError(f"{source}: this ControlNet was trained for another UNet ({k}: ControlNet "
                        f"{controlnet.config.get(k)}, SD {unet.config.get(k)}); pass the SD it was trained on")


def _as_list(v):
    return v if isinstance(v, (list, tuple)) else [v]


def _not_a_controlnet(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; --controlnet takes the folder p3_controlnet/train.py writes (OUT/controlnet)")


def load_controlnet(path: str | os.PathLike, device="cpu", dtype=torch.float32):
    """A ControlNet folder written by train.py (or any diffusers ControlNet folder)."""
    from diffusers import ControlNetModel

    from common.stable_diffusion import load_diffusers_model
    path = Path(path)
    if not (path / "config.json").is_file():
        if path.resolve() == DEFAULT_CONTROLNET.resolve():
            raise UserError(f"{path}: no trained ControlNet here (the default). Train one with "
                            f"`python p3_controlnet/train.py --sd SD_CKPT --data hw2_data/fill50k --out runs/p3` "
                            f"and pass runs/p3/controlnet as the 5th argument of hw2_3.sh (or --controlnet), "
                            f"or copy it to {path}")
        what = "not found" if not path.exists() else "not a ControlNet folder (no config.json)"
        raise UserError(f"{path}: {what}; --controlnet takes the folder train.py writes (OUT/controlnet)")
    try:
        net = load_diffusers_model(ControlNetModel, path, bad_path=_not_a_controlnet, fits="a ControlNet")
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: not a readable ControlNet ({one_line(e)})") from None
    from common.stable_diffusion import cast

    return cast(net, dtype).to(device).eval()


TRAIN_INFO = "train.json"  # beside the weights in a folder train.py exports: how and how far it was trained


def save_controlnet(controlnet, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    info: dict | None = None) -> Path:
    """Write a ControlNet folder atomically: a finished folder replaces the old one, never a half-written one;
    `info` goes into it as TRAIN_INFO."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {
            k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in controlnet.state_dict().items()
        }
        from safetensors.torch import save_file
        controlnet.save_config(tmp)  # config.json, as save_pretrained writes it
        save_file(state, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        if info is not None:
            (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        share_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@torch.no_grad()
def sample_controlnet_images(net: ControlledUNet, vae, scheduler, cond: torch.Tensor, uncond: torch.Tensor,
                             control: torch.Tensor, seeds, steps: int = 50, guidance: float = 7.5,
                             control_scale: float = 1.0, amp_dtype: torch.dtype | None = None,
                             progress: bool = False) -> torch.Tensor:
    """P3: SD images steered by a ControlNet. Images in [-1, 1] (B,3,H,W) for control images (B,3,H,W) in
    [0,1] and (B,77,D) prompt contexts; the UNet, ControlNet and VAE decoder run under autocast to
    `amp_dtype` (None: exact fp32).

    DDIM with eta 0 from per-sample seeded noise (sample i starts from noise seeded with seeds[i]), with
    classifier-free guidance; the control image steers both the conditional and the unconditional pass,
    as in the ControlNet authors' sampler.
    """
    from common.stable_diffusion import decode_latents, initial_latents, sample_latents
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = control.shape[-2:]
    if h % factor or w % factor:
        raise UserError(f"control images must have sides divisible by {factor}, got {w}x{h}")
    device = control.device
    guided = guidance != 1.0
    # padded with copies of the last image (dropped) so that each image is the same bits in any batch
    # (common.seeding.BATCH_QUANTUM); sample_latents and decode_latents then pad no further
    n = len(seeds)
    size = padded_size(n, 2 if guided else 1, device)
    control, cond, seeds = pad_items(control, size), pad_items(cond, size), pad_items(list(seeds), size)
    uncond = pad_items(uncond, size) if uncond is not None else None
    latents = initial_latents(seeds, (net.unet.config.in_channels, h // factor, w // factor), device)
    control_in = torch.cat([control, control]) if guided else control
    dtype = net.controlnet.dtype

    def residuals(x, t, context):
        return net.residuals(x, t, context, control_in.to(dtype), control_scale)

    x = sample_latents(net.unet, scheduler, latents, cond, uncond if guided else None, steps=steps,
                       guidance=guidance, unet_kwargs_fn=residuals, progress=progress, amp_dtype=amp_dtype)
    with autocast(device, amp_dtype):
        return decode_latents(vae, x)[:n]
