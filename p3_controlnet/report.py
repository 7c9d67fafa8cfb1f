#!/usr/bin/env python
"""Report figure: one control image with two circles, generated for the course's two two-circle prompts.

    python p3_controlnet/report.py --sd sd-v1-4.ckpt --controlnet runs/p3/controlnet --out report/p3_two_circles.png

The ControlNet was trained on one circle a picture; this shows whether it generalises to two circles
and to prompts naming two circle colours. Writes OUT (control | prompt 1 | prompt 2) and, beside it,
OUT_control.png (the control image), OUT_1.png, OUT_2.png (the generated images at full size) and
OUT.png.json (what the figure shows, the weights, sampler, steps, seed and the command).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import common.stable_diffusion as sdlib
from common.config import HelpFormatter, finite_float, int_at_least
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.figure_info import command_line, figure_out, write_figure_info
from common.images import save_grid, save_png, to_uint8
from p3_controlnet.model import (
    DEFAULT_CONTROLNET,
    ControlledUNet,
    check_compatible,
    load_controlnet,
    sample_controlnet_images,
    use_sdpa,
)

PROMPTS = ("a red circle and a blue circle with pink background",
           "a green circle and a yellow circle with blue background")


def two_circle_control(size: int) -> np.ndarray:
    """Two circle outlines, white on black, in the Fill50k style (line width size/128)."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    width = max(1, round(size / 128))
    for cx, cy, r in ((0.3, 0.38, 0.18), (0.68, 0.64, 0.2)):
        draw.ellipse(
            [(cx - r) * size, (cy - r) * size, (cx + r) * size, (cy + r) * size], outline=(255, 255, 255), width=width
        )
    return np.asarray(img)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt or a diffusers folder")
    p.add_argument("--controlnet", default=str(DEFAULT_CONTROLNET), help="ControlNet folder written by train.py")
    p.add_argument("--out", required=True, help="figure path (.png)")
    p.add_argument("--control", default=None, help="use this control image instead of the drawn two-circle one")
    p.add_argument("--size", "--resolution", type=int, default=None,
                   help="image side in pixels (default: the SD's native resolution: 512 for SD v1.4, 64 for the mini "
                        "SD)")
    p.add_argument("--steps", type=int_at_least(1), default=50, help="DDIM steps")
    p.add_argument("--guidance", type=finite_float, default=7.5,
                   help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u)")
    p.add_argument("--seed", type=int, default=42, help="seed of the starting noise")
    add_device_flag(p)
    add_precision_flag(p, what="Stable Diffusion and the ControlNet (with bf16, the UNet, VAE and ControlNet weights "
                                "are held in bf16 too; the text encoder stays fp32)")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = figure_out(args.out)
    device = pick_device(args.device)
    ac = autocast_dtype(device, args.precision)
    dtype = ac or torch.float32
    controlnet = load_controlnet(args.controlnet, device, dtype)
    sd = sdlib.load_sd(args.sd, device, dtype)
    check_compatible(controlnet, sd.unet, args.controlnet)
    if args.size is None:
        args.size = sd.native_resolution
    if args.size % sd.size_multiple:
        raise UserError(f"--size must be a multiple of {sd.size_multiple} for this SD, got {args.size}")
    if args.control:
        from p3_controlnet.data import load_control

        control_img = (
            (load_control(Path(args.control), args.size).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        )
    else:
        control_img = two_circle_control(args.size)
    sd.freeze()
    net = ControlledUNet(sd.unet, controlnet.requires_grad_(False)).eval()
    use_sdpa(net.unet, net.controlnet)
    with torch.no_grad():
        cond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, list(PROMPTS), device)
        uncond = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, ["", ""], device)
    control = (
        torch.from_numpy(control_img.copy()).permute(2, 0, 1).float().div(255).to(device)[None].expand(2, -1, -1, -1)
    )
    images = to_uint8(sample_controlnet_images(net, sd.vae, sdlib.make_ddim_scheduler(sd.noise_scheduler), cond,
                                               uncond, control, [args.seed, args.seed], steps=args.steps,
                                               guidance=args.guidance, amp_dtype=ac))
    stem = out.with_suffix("")
    save_png(f"{stem}_control.png", control_img)
    for k, img in enumerate(images, start=1):
        save_png(f"{stem}_{k}.png", img)
    save_grid(out, np.stack([control_img, *images]), 1, 3, col_labels=["control"] + [f"prompt {k}" for k in (1, 2)])
    write_figure_info(out, f"two-circle control and its two prompts: '{PROMPTS[0]}' | '{PROMPTS[1]}'",
                      command_line(__file__, argv), controlnet=args.controlnet, sd=args.sd, sampler="ddim",
                      size=args.size, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(f"wrote {out}: control | '{PROMPTS[0]}' | '{PROMPTS[1]}'")


if __name__ == "__main__":
    main()
