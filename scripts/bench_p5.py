#!/usr/bin/env python
"""Problem 5 benchmark: textual-inversion training steps and 25-image generation, with random SD weights.

    python scripts/bench_p5.py                          # CPU: tiny SD components (the test suite's), 64x64
    python scripts/bench_p5.py --sd14 --device cuda     # GPU: SD v1.4-sized components, batch 4, 512x512

Training is timed for two set-ups side by side in one process: exact fp32 (TF32 matmuls on CUDA, as the
trainer runs), and bf16 autocast with the frozen UNet/VAE held in bf16 plus gradient checkpointing (what
train_ti.py does on CUDA). Reported: steps/s after warm-up steps, and on CUDA the peak allocated memory.
Generation is one prompt's 25 images (DDIM, classifier-free guidance, then VAE decoding) as hw2_ti.sh
makes them. Speed does not depend on the weights, so random ones stand in for sd-v1-4.ckpt. The table is
printed and written into BENCHMARKS.md between the bench_p5 markers.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import common.stable_diffusion as sdlib
from common.config import HelpFormatter, int_at_least
from common.device import add_device_flag, channels_last_pays, device_name, pick_device, setup_cuda_fast_math
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic
from common.paths import SHARED_DATA
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]

SHARED_DOG = SHARED_DATA / "dreambooth" / "dog"


def sd14_components(seed: int = 0) -> sdlib.SDComponents:
    """SD v1.4's architecture (shipped configs) with random weights: 860 M UNet, 84 M VAE, 123 M text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)

    def cfg(name):
        return {k: v for k, v in sdlib.shipped_config(name).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg("unet"))
    vae = AutoencoderKL.from_config(cfg("vae"))
    text = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
    return sdlib.SDComponents(vae.eval(), unet.eval(), text.eval(), sdlib.build_clip_tokenizer(),
                              sdlib.make_ddpm_scheduler(), "random SD v1.4-sized")


def tiny_components(seed: int = 0) -> sdlib.SDComponents:
    from common.sd_export import tiny_sd_components
    return tiny_sd_components(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_training(make, device, bf16_ckpt: bool, batch: int, res: int, steps: int, warmup: int, photos: Path) -> dict:
    from p5_personalization.train_ti import ConceptImages, P5TrainConfig, TextualInversionModule
    concepts = [{"images": str(photos), "token": "<new1>", "init_word": "dog", "property": "object", "vectors": 1}]
    module = TextualInversionModule(sd_path="random", concepts=concepts,
                                    config=P5TrainConfig(method="ti", gradient_checkpointing=bf16_ckpt),
                                    frozen_dtype="bf16" if bf16_ckpt else "fp32", components=make())
    module.to(device)
    module.sd.to(device)
    opt = module.configure_optimizers()["optimizer"]
    data = ConceptImages(concepts, res, length=(steps + warmup) * batch)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16_ckpt else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i):
        items = [data[i * batch + j] for j in range(batch)]
        pixels = torch.stack([x["pixel_values"] for x in items]).to(device)
        g = torch.Generator(device).manual_seed(i)
        with amp:
            loss = module.diffusion_loss(pixels, [x["prompt"] for x in items], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    sync(device)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"steps_per_s": steps / secs, "peak_gib": peak, "loss": float(loss.detach())}


def bench_generation(make, device, bf16: bool, res: int, steps: int, count: int, batch: int) -> float:
    from p5_personalization.infer_ti import sample_ti_images
    sd = make().freeze()
    if bf16:
        sd.unet.to(torch.bfloat16)
        sd.vae.to(torch.bfloat16)
    sd.to(device)
    if channels_last_pays(device):
        sd.unet.to(memory_format=torch.channels_last)
    amp = torch.bfloat16 if bf16 else None
    sample_ti_images(sd, "a photo of a dog", [0], res, 1, 7.5, "", 1, amp)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    images = sample_ti_images(sd, "a photo of a dog on the beach", list(range(count)), res, steps, 7.5, "", batch,
                              amp)
    sync(device)
    assert images.shape == (count, res, res, 3)
    return time.perf_counter() - t0


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sd14", action="store_true", help="SD v1.4-sized random components (default: the tiny test ones)")
    add_device_flag(p)
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="training batch")
    p.add_argument("--resolution", "--size", type=int, default=None,
                   help="image side (default 512 with --sd14, else 64)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="timed training steps (default 20 with --sd14, else 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--gen-steps", type=int, default=50, help="DDIM steps for the generation timing (0: skip it)")
    p.add_argument("--gen-count", type=int, default=25, help="images generated for one prompt")
    p.add_argument("--gen-batch", type=int, default=25, help="images per UNet batch when generating")
    p.add_argument("--photos", default=str(SHARED_DOG), help="training photos (the shared DreamBooth dog)")
    p.add_argument("--write", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file (scripts/gpu_check.py)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.sd14 and device.type != "cuda":
        print("note: SD v1.4-sized training on a CPU takes minutes per step", flush=True)
    res = args.resolution or (512 if args.sd14 else 64)
    steps = args.steps or (20 if args.sd14 else 10)
    if not Path(args.photos).is_dir():
        raise UserError(f"{args.photos}: training photos not found (pass --photos DIR)")
    setup_cuda_fast_math()
    make = sd14_components if args.sd14 else tiny_components
    size = "SD v1.4-sized" if args.sd14 else "tiny (common/sd_export.py)"

    rows = []
    results = {}
    for name, bf16 in (("fp32" + (" (TF32 matmuls)" if device.type == "cuda" else ""), False),
                       ("bf16 autocast + bf16 frozen UNet/VAE + gradient checkpointing", True)):
        r = bench_training(make, device, bf16, args.batch_size, res, steps, args.warmup, Path(args.photos))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the set-up's model is gone: do not let its cache count for the next
        results[bf16] = r
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        rows.append(f"| {name} | {r['steps_per_s']:.2f} | {3000 / r['steps_per_s'] / 60:.1f} | {peak} |")
        print(rows[-1], flush=True)
    ratio = results[True]["steps_per_s"] / results[False]["steps_per_s"]
    numbers = {"device": device_name(device), "sd14": args.sd14, "batch": args.batch_size, "resolution": res,
               "steps": steps, "fp32": results[False], "bf16_checkpointing": results[True], "generation": None}
    gen_line = ""
    if args.gen_steps:
        secs = bench_generation(
            make, device, device.type == "cuda", res, args.gen_steps, args.gen_count, args.gen_batch
        )
        prec = "bf16" if device.type == "cuda" else "fp32"
        numbers["generation"] = {"seconds": secs, "images": args.gen_count, "steps": args.gen_steps,
                                 "batch": args.gen_batch, "precision": prec}
        gen_line = (
            f"\n\nGeneration, one prompt: {args.gen_count} images of {res}x{res}, {args.gen_steps} DDIM steps with "
            f"classifier-free guidance (batch {args.gen_batch}, {prec}), VAE decoding included: **{secs:.1f} s**."
        )
        print(gen_line.strip(), flush=True)
    cmd = "python scripts/bench_p5.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = (f"## P5: textual inversion (scripts/bench_p5.py)\n\n"
            f"Device: {device_name(device)}. {size} components with random weights, training batch {args.batch_size} "
            f"at {res}x{res}, {steps} timed steps after {args.warmup} warm-up steps, one token of one vector.\n\n"
            f"| set-up | steps/s | minutes for 3000 steps | peak GPU memory (GiB) |\n|---|---|---|---|\n"
            + "\n".join(rows) +
            f"\n\nbf16 + checkpointing / fp32 speed: **{ratio:.2f}x**.{gen_line}\n\nCommand: `{cmd.strip()}`\n")
    if not args.sd14:
        body += ("\nThese are tiny-model CPU numbers, a check that the code paths run, not a prediction for SD v1.4. "
                 "The SD v1.4-sized GPU numbers (`python scripts/bench_p5.py --sd14 --device cuda`) have not been "
                 "measured yet: no GPU was available when this section was written.\n")
    print(body)
    if args.json:
        write_text_atomic(args.json, json.dumps(numbers, indent=1) + "\n")
    if args.write:
        replace_section(args.write, "bench_p5" + ("_sd14" if args.sd14 else ""), body)
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
