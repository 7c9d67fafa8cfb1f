#!/usr/bin/env python
"""Generate images with Stable Diffusion v1.4 + a trained ControlNet, from control images and prompts.

    python p3_controlnet/infer.py --prompts hw2_data/fill50k/testing/prompt.json \\
        --source-dir hw2_data/fill50k/testing/source --out OUT --sd sd-v1-4.ckpt --controlnet runs/p3/controlnet

For each line {"source", "target", "prompt"} of --prompts, writes OUT/<target> (RGB PNG, --size px;
by default the model's native resolution, 512 for SD v1.4 and 64 for the mini SD) from
the control image SOURCE_DIR/<source>. Defaults are the course's: DDIM 50 steps, eta 0, guidance 7.5,
seed 42; line i starts from latent noise seeded with seed + i, so an image depends only on its line,
never on --batch-size (to the bit on the CPU: common.seeding.BATCH_QUANTUM).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import common.stable_diffusion as sdlib
from common.config import HelpFormatter, finite_float, int_at_least
from common.datasets import load_image
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.fileio import all_or_nothing, check_writable, folder_error, remove_stale_temps
from common.images import save_pngs, to_uint8
from p3_controlnet.data import load_control, read_prompt_file
from p3_controlnet.model import (
    DEFAULT_CONTROLNET,
    ControlledUNet,
    check_compatible,
    load_controlnet,
    sample_controlnet_images,
    use_sdpa,
)

DEFAULTS = dict(steps=50, guidance=7.5, seed=42)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompts", required=True, help="prompt.json: one {source, target, prompt} JSON object a line")
    p.add_argument("--source-dir", required=True, help="folder of the control images named by 'source'")
    p.add_argument("--out", required=True, help="output folder; OUT/<target> is written for each line")
    p.add_argument("--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt (LDM keys) or a diffusers folder")
    p.add_argument("--controlnet", default=str(DEFAULT_CONTROLNET),
                   help="ControlNet folder written by train.py (OUT/controlnet); default checkpoints/controlnet")
    p.add_argument("--steps", type=int_at_least(1), default=DEFAULTS["steps"], help="DDIM steps")
    p.add_argument("--guidance", type=finite_float, default=DEFAULTS["guidance"],
                   help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u); 1 = no guidance")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="line i uses seed + i")
    p.add_argument("--control-scale", type=finite_float, default=1.0, help="multiplier of the ControlNet residuals")
    p.add_argument("--size", "--resolution", type=int, default=None,
                   help="output side in pixels; control images are resized to it (default: the SD's native "
                        "resolution, 512 for SD v1.4, 64 for the mini SD)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="images per batch (the guided pass doubles it)")
    add_device_flag(p)
    add_precision_flag(p, what="Stable Diffusion and the ControlNet (with bf16, the UNet, VAE and ControlNet weights "
                                "are held in bf16 too; the text encoder stays fp32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main(sigterm=True)
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise UserError(f"--size must be a positive multiple of 8, got {args.size}")
    t0 = time.time()
    items = read_prompt_file(args.prompts)
    names = [it["target"] for it in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{args.prompts}: target {dup[0]!r} appears more than once")
    src_dir = Path(args.source_dir)
    if not src_dir.is_dir():
        raise folder_error(src_dir, "source folder not found")
    for it in items:
        if not (src_dir / it["source"]).is_file():
            raise UserError(f"{src_dir / it['source']}: control image listed in {args.prompts} not found")
    for source in dict.fromkeys(it["source"] for it in items):
        load_image(src_dir / source)  # decoded in full now: a truncated image fails before any model is loaded
    controls = {(src_dir / it["source"]).resolve() for it in items}
    clash = next((n for n in names if (Path(args.out) / n).resolve() in controls), None)
    if clash is not None:
        raise UserError(f"{Path(args.out) / clash}: is a control image of --source-dir, which the output would "
                        f"overwrite; write to another --out")
    out = check_writable(args.out)
    remove_stale_temps(*{(out / name).parent for name in names})  # what a killed earlier run left
    device = pick_device(args.device)
    if args.quiet:
        sdlib.quiet_libraries()
    ac_dtype = autocast_dtype(device, args.precision)
    weight_dtype = ac_dtype or torch.float32

    controlnet = load_controlnet(args.controlnet, device, weight_dtype)  # first: its absence is the cheap error
    sd = sdlib.load_sd(args.sd, device, weight_dtype)
    sdlib.check_sampling_steps(args.steps, sd)
    check_compatible(controlnet, sd.unet, args.controlnet)
    sd.freeze()
    net = ControlledUNet(sd.unet, controlnet.requires_grad_(False)).eval()
    use_sdpa(net.unet, net.controlnet)
    multiple = sd.size_multiple
    if args.size is None:
        args.size = sd.native_resolution
    if args.size % multiple:
        raise UserError(f"--size must be a multiple of {multiple} for this SD (64 for SD v1), got {args.size}")

    with torch.no_grad():
        prompts = sorted({it["prompt"] for it in items})
        emb = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, prompts, device)
        uncond1 = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [""], device)
    row = {p: k for k, p in enumerate(prompts)}
    scheduler = sdlib.make_ddim_scheduler(sd.noise_scheduler)
    done = 0
    with all_or_nothing():  # every image lands at the end: a failure or SIGTERM adds no file to OUT
        for start in range(0, len(items), args.batch_size):
            batch = items[start:start + args.batch_size]
            control = torch.stack([load_control(src_dir / it["source"], args.size) for it in batch]).to(device)
            cond = emb[[row[it["prompt"]] for it in batch]]
            uncond = uncond1.expand(len(batch), -1, -1)
            images = sample_controlnet_images(
                net,
                sd.vae,
                scheduler,
                cond,
                uncond,
                control,
                [args.seed + start + i for i in range(len(batch))],
                steps=args.steps,
                guidance=args.guidance,
                control_scale=args.control_scale,
                amp_dtype=ac_dtype,
                progress=not args.quiet,
            )
            save_pngs(out, [it["target"] for it in batch], to_uint8(images))
            done += len(batch)
            if not args.quiet:
                print(f"{done}/{len(items)} images sampled", file=sys.stderr)
    print(f"wrote {len(items)} images to {out} (DDIM {args.steps} steps, eta 0, guidance {args.guidance}, "
          f"seed {args.seed}+line) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
