"""Build Stable Diffusion v1 components from configs, and write an SDComponents in either file format.

`build_sd_components(unet, vae, text)` makes randomly initialised components of any size from config
dicts (TINY_* below: a tiny SD for CPU tests and benchmarks; a "mini SD" is the same with other configs).
`write_diffusers_folder` writes the diffusers layout (unet/ vae/ text_encoder/ scheduler/ model_index.json),
`write_ldm_checkpoint` one single file under the original LDM key names (model.diffusion_model.*,
first_stage_model.*, cond_stage_model.transformer.*) as sd-v1-4.ckpt has them, .ckpt (a torch pickle
with 'state_dict') or .safetensors. Both read back with `common.stable_diffusion.load_sd`.

The diffusers -> LDM key mapping here is written independently of diffusers' LDM -> diffusers converter
that `load_sd` uses, so a round trip through both checks that loader.

TINY_* sizes follow what `load_sd` can read back from a single-file checkpoint: GroupNorm groups 32 and
8 UNet heads (the SD v1 values, not stored in weights), CLIP heads 64 wide. The VAE has four levels, so
latents are 1/8 of the image as in SD (a 64x64 image -> 8x8x4 latents), which the ControlNet
conditioning encoder (three stride-2 convs) expects.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_UNET = dict(
    block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64), layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=64, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TINY_IMAGE = 64  # pixels; latents are 8x8


def randomise_zeros(module: torch.nn.Module, generator: torch.Generator) -> None:
    """diffusers zero-initialises some output convs; give every all-zero weight small random values so
    each tensor matters to the output (a wrong key mapping would then change it)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 0 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build_sd_components(unet_config: dict, vae_config: dict, text_config: dict, seed: int = 0,
                        name: str | None = None):
    """A randomly initialised SDComponents (fp32, eval mode, CPU) of the given UNet2DConditionModel,
    AutoencoderKL and CLIPTextConfig sizes, with no all-zero weight; a pure function of the configs and seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.stable_diffusion import SDComponents, build_clip_tokenizer, make_ddpm_scheduler
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for m in (unet, vae, text_encoder):
        randomise_zeros(m, g)
        m.eval()
    return SDComponents(vae, unet, text_encoder, build_clip_tokenizer(), make_ddpm_scheduler(),
                        name or f"random(seed={seed})")


def tiny_sd_components(seed: int = 0):
    """A tiny random SDComponents (TINY_* sizes; fp32, eval mode, CPU)."""
    return build_sd_components(TINY_UNET, TINY_VAE, TINY_TEXT, seed, f"tiny(seed={seed})")


# ------------------------------------------------------------------ diffusers -> original LDM key names

def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per = layers_per_block + 1
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        stem, leaf = ".".join(parts[:-1]), parts[-1]
        if stem in top:
            new = f"{top[stem]}.{leaf}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                new = f"input_blocks.{1 + b * per + int(parts[3])}.0.{resnet[parts[4]]}.{leaf}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * per + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(b + 1) * per}.0.op.{leaf}"
        elif parts[0] == "mid_block":
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}.{resnet[parts[3]]}.{leaf}"
            else:
                new = "middle_block.1." + ".".join(parts[3:])
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "resnets":
                new = f"output_blocks.{b * per + int(parts[3])}.0.{resnet[parts[4]]}.{leaf}"
            elif kind == "attentions":
                new = f"output_blocks.{b * per + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # upsamplers.0.conv: after the last layer's resnet (and attention, if any)
                new = f"output_blocks.{b * per + per - 1}.{2 if b in up_has_attn else 1}.conv.{leaf}"
        else:
            raise KeyError(f"unmapped UNet key {k}")
        out[new] = v
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        leaf = parts[-1]
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[k] = v
            continue
        side = parts[0]  # encoder / decoder
        rest = parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            new = f"{side}.{rest[0]}.{leaf}"
        elif rest[0] == "conv_norm_out":
            new = f"{side}.norm_out.{leaf}"
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                new = f"{side}.mid.block_{int(rest[2]) + 1}.{resnet[rest[3]]}.{leaf}"
            else:  # attentions.0.<name>: LDM uses 1x1 convs for q, k, v and the output projection
                name = ".".join(rest[3:-1])
                new = f"{side}.mid.attn_1.{attn[name]}.{leaf}"
                if leaf == "weight" and name != "group_norm":
                    v = v[:, :, None, None]
        elif rest[0] in ("down_blocks", "up_blocks"):
            i = int(rest[1])
            level, word = (i, "down") if rest[0] == "down_blocks" else (num_levels - 1 - i, "up")
            if rest[2] == "resnets":
                new = f"{side}.{word}.{level}.block.{rest[3]}.{resnet[rest[4]]}.{leaf}"
            else:
                new = f"{side}.{word}.{level}.{'downsample' if word == 'down' else 'upsample'}.conv.{leaf}"
        else:
            raise KeyError(f"unmapped VAE key {k}")
        out[new] = v
    return out


def components_to_ldm(comps) -> dict[str, torch.Tensor]:
    """One flat LDM-keyed state dict (plus the schedule buffers an LDM checkpoint carries)."""
    sd = {}
    unet = unet_to_ldm(comps.unet.state_dict(), comps.unet.config.layers_per_block)
    sd.update({"model.diffusion_model." + k: v for k, v in unet.items()})
    vae = vae_to_ldm(comps.vae.state_dict(), len(comps.vae.config.block_out_channels))
    sd.update({"first_stage_model." + k: v for k, v in vae.items()})
    # SD v1 files hold CLIP weights as `text_model.*` (transformers 4.x names; transformers 5 drops the level)
    sd.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in comps.text_encoder.state_dict().items()})
    n = comps.text_encoder.config.max_position_embeddings
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    sd["alphas_cumprod"] = comps.noise_scheduler.alphas_cumprod.clone()
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------ writers

def write_diffusers_folder(comps, folder: str | os.PathLike) -> Path:
    """`comps` as a diffusers-format folder (unet/ vae/ text_encoder/ scheduler/ model_index.json); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comps.unet.save_pretrained(folder / "unet")
    comps.vae.save_pretrained(folder / "vae")
    comps.text_encoder.save_pretrained(folder / "text_encoder")
    comps.noise_scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_ldm_checkpoint(comps, path: str | os.PathLike, extra: dict | None = None,
                         native_resolution: int | None = None) -> Path:
    """`comps` as one LDM-keyed single file, as the original SD v1 checkpoints are; returns the path.

    `.safetensors`: the flat tensor dict. Any other suffix (.ckpt): a torch pickle {'state_dict': ...,
    **extra}, as sd-v1-4.ckpt holds (it also has 'global_step' and pickled Lightning objects).
    native_resolution: recorded in the file (safetensors metadata, or a top-level .ckpt entry) for a model
    not trained at SD v1's 512 px, so load_sd builds it with its own sample size.
    """
    from common.stable_diffusion import NATIVE_RESOLUTION_KEY
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = components_to_ldm(comps)
    if path.suffix.lower() == ".safetensors":
        if extra:
            raise ValueError("a .safetensors file holds tensors only: no `extra` entries")
        from safetensors.torch import save_file
        meta = {NATIVE_RESOLUTION_KEY: str(native_resolution)} if native_resolution else None
        save_file(sd, str(path), metadata=meta)
    else:
        extra = dict(extra or {})
        if native_resolution:
            extra[NATIVE_RESOLUTION_KEY] = int(native_resolution)
        torch.save({"state_dict": sd, **extra}, path)
    return path
