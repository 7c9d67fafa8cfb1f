"""The mini Stable Diffusion (issue 16): SD v1's classes and schedule at a size a 2-core CPU can train.

Same classes as SD v1.x, so P3 (ControlNet) and P5 (textual inversion) use it exactly as they use SD v1.4:
  AutoencoderKL          64 px images -> 8x8x4 latents (four levels, as SD), 1.25 M parameters
  UNet2DConditionModel   64/128/128 channels, cross-attention on the first two levels, 5.9 M parameters
  CLIPTextModel          3 layers, width 128 (64-wide heads), SD's CLIP tokenizer and 77 tokens, 6.9 M
                         parameters, 6.3 M of them the 49408-token table
  DDPMScheduler          SD's scaled-linear 1000-step schedule (common/sd_v1_configs/scheduler.json)

The sizes respect what `common.stable_diffusion` reads back from an LDM-keyed single file, where only the
shapes are stored: GroupNorm groups 32 (so every width is a multiple of 32), attention_head_dim 8 in the
UNet (SD v1's value) and 64-wide CLIP heads. The latent scale is SD's 0.18215 too: the trained VAE's latent
spread is folded into its weights (`fold_latent_scale`) instead of stored as another scaling factor, which
an LDM file could not carry.

`export_diffusers` writes the diffusers folder `load_sd` reads (fp16 weights), with `mini_sd.json`
recording how the model was trained and its native resolution; `export_single_file` the same weights as
one LDM-keyed file (as sd-v1-4.ckpt is laid out), through common/sd_export.py.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch

from common.fileio import atomic_path, ensure_dir, read_json, share_tree, write_text_atomic

MINI_IMAGE = 64  # native resolution in pixels; latents are 8x8
MINI_VAE = dict(
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=MINI_IMAGE, scaling_factor=0.18215,
)
MINI_UNET = dict(
    block_out_channels=(64, 128, 128), layers_per_block=1, sample_size=MINI_IMAGE // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
MINI_TEXT = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
INFO_FILE = "mini_sd.json"


def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**(config or MINI_VAE))


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**(config or MINI_UNET))


def build_text_encoder(config: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**(config or MINI_TEXT)))


def mini_sd_components(seed: int = 0, vae=None, unet=None, text_encoder=None):
    """SDComponents of the mini architecture: the given modules, the others freshly initialised from `seed`."""
    from common.stable_diffusion import SDComponents, build_clip_tokenizer, make_ddpm_scheduler
    torch.manual_seed(seed)
    vae = vae if vae is not None else build_vae()
    unet = unet if unet is not None else build_unet()
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder()
    tokenizer = build_clip_tokenizer(text_encoder.config.max_position_embeddings)
    return SDComponents(vae, unet, text_encoder, tokenizer, make_ddpm_scheduler(), f"mini_sd(seed={seed})")


@torch.no_grad()
def fold_latent_scale(vae, factor: float) -> None:
    """Multiply the VAE's latent space by `factor` in place, decoding unchanged: posterior means (and their
    spread) scale by `factor` and the decoder's first convolution divides it out again.

    With factor = 1 / (latent std * scaling_factor), `encode(x) * scaling_factor` has unit spread, what SD's
    UNet expects, while the config keeps SD's 0.18215."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"latent scale factor must be positive and finite, got {factor}")
    n = vae.config.latent_channels
    vae.quant_conv.weight[:n] *= factor
    vae.quant_conv.bias[:n] *= factor
    vae.quant_conv.bias[n:] += 2 * math.log(factor)  # log-variance: the std scales with the mean
    vae.post_quant_conv.weight /= factor


def _save_fp16(module, folder: Path, dtype: torch.dtype) -> None:
    copy.deepcopy(module).to(dtype).save_pretrained(folder, safe_serialization=True)


def export_diffusers(comps, folder: str | os.PathLike, info: dict, dtype: torch.dtype = torch.float16) -> Path:
    """Write `comps` as a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/,
    model_index.json) in `dtype`, plus INFO_FILE with `info` (how it was trained, its native resolution).

    Written into a temporary folder beside `folder` and renamed over it, so a reader never sees a half-written
    model; an existing `folder` is replaced."""
    folder = Path(folder)
    ensure_dir(folder.parent if str(folder.parent) else ".")
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_fp16(comps.unet, tmp / "unet", dtype)
        _save_fp16(comps.vae, tmp / "vae", dtype)
        _save_fp16(comps.text_encoder, tmp / "text_encoder", dtype)
        comps.noise_scheduler.save_pretrained(tmp / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]}
        write_text_atomic(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
        write_text_atomic(tmp / INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        share_tree(tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def export_single_file(comps, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """`comps` as one LDM-keyed .safetensors (or .ckpt) file in `dtype`, written atomically."""
    from common.sd_export import write_ldm_checkpoint
    from common.stable_diffusion import SDComponents
    path = Path(path)
    cast = SDComponents(*(copy.deepcopy(m).to(dtype) for m in (comps.vae, comps.unet, comps.text_encoder)),
                        comps.tokenizer, comps.noise_scheduler, comps.source)
    with atomic_path(path) as tmp:
        # the writer picks the format from the suffix; the temporary name must keep it
        named = tmp.with_suffix(path.suffix)
        try:
            write_ldm_checkpoint(cast, named, native_resolution=comps.native_resolution)
            named.replace(tmp)
        finally:
            named.unlink(missing_ok=True)
    return path


def read_info(folder: str | os.PathLike) -> dict | None:
    """The INFO_FILE of an exported mini model, or None for a folder without one (e.g. SD v1.4)."""
    path = Path(folder) / INFO_FILE
    return read_json(path, "mini SD info") if path.is_file() else None
