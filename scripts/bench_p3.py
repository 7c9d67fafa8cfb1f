#!/usr/bin/env python
"""P3 ControlNet training speed and memory.

    python scripts/bench_p3.py                 # CPU: tiny-config step time (what a laptop can check)
    python scripts/bench_p3.py --gpu           # CUDA: SD1.4-sized random components, batch 4 at 512x512,
                                               # fp32 vs bf16 autocast + gradient checkpointing
    add --write to put the table into BENCHMARKS.md (section p3)

A step is what train.py does per batch: VAE-encode the targets, add noise, ControlNet + frozen UNet
forward, backward into the ControlNet, AdamW step. The GPU run uses random weights of SD v1.4's exact
shapes (from common/sd_v1_configs; nothing downloaded), so its timings hold for the real model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common.stable_diffusion as sdlib
from common.config import HelpFormatter, int_at_least
from common.device import device_name, fused_adamw_pays
from common.fileio import write_text_atomic
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]


def sd14_random(device) -> sdlib.SDComponents:
    """SD v1.4-shaped VAE, UNet and text encoder with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(strip(sdlib.shipped_config("unet")))
        vae = AutoencoderKL.from_config(strip(sdlib.shipped_config("vae")))
        text = CLIPTextModel(CLIPTextConfig(**sdlib.shipped_config("text_encoder")))
    return sdlib.SDComponents(
        vae, unet, text, sdlib.build_clip_tokenizer(), sdlib.make_ddpm_scheduler(), "random SD1.4 shapes"
    )


def bench(sd, device, batch: int, size: int, bf16: bool, checkpointing: bool, steps: int, warmup: int) -> dict:
    from p3_controlnet.train import ControlNetModule, P3TrainConfig
    prompts = ["", "red circle with blue background"]
    module = ControlNetModule(sd=sd, prompts=prompts, empty_prompt_id=0,
                              config=P3TrainConfig(gradient_checkpointing=checkpointing),
                              frozen_dtype=torch.bfloat16 if bf16 else torch.float32).to(device)
    module.cache_text_embeddings()
    opt = torch.optim.AdamW(module.net.controlnet.parameters(), lr=1e-5, fused=fused_adamw_pays(device))
    module.train()
    g = torch.Generator().manual_seed(0)
    batch_data = {"control": torch.rand(batch, 3, size, size, generator=g).to(device),
                  "target": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
                  "prompt_id": torch.ones(batch, dtype=torch.long, device=device)}
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else __import__("contextlib").nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = module.diffusion_loss(batch_data, drop_prompts=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"s_per_step": dt, "steps_per_s": 1 / dt, "peak_gib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run the SD1.4-sized CUDA benchmark (needs a GPU)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md (section p3)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file (scripts/gpu_check.py)")
    args = p.parse_args(argv)
    numbers: dict = {"cpu_tiny": None, "gpu": None}
    lines = ["## P3: ControlNet training step", ""]
    torch.manual_seed(0)

    # CPU, tiny config: always
    from common.sd_export import TINY_IMAGE, tiny_sd_components
    cpu = torch.device("cpu")
    r = bench(tiny_sd_components(0), cpu, batch=2, size=TINY_IMAGE, bf16=False, checkpointing=False,
              steps=args.steps or 5, warmup=2)
    lines += [
        f"CPU, tiny random SD (common/sd_export.py: UNet 32/32/64, {TINY_IMAGE}x{TINY_IMAGE} images, batch 2, fp32), "
        f"{device_name(cpu)}:",
        "",
        "| config | s/step |",
        "| --- | ---: |",
        f"| tiny fp32 | {r['s_per_step']:.3f} |",
        "",
        "Command: `OMP_NUM_THREADS=1 python scripts/bench_p3.py --write` (a check that the step runs, not a "
        "speed that transfers to SD1.4).",
        "",
    ]
    print(f"CPU tiny: {r['s_per_step']:.3f} s/step")
    numbers["cpu_tiny"] = {"device": device_name(cpu), "s_per_step": r["s_per_step"]}

    if args.gpu:
        if not torch.cuda.is_available():
            msg = "GPU benchmark requested but no CUDA device is available here: not run, no numbers."
            print(msg)
            lines += [msg, ""]
        else:
            dev = torch.device("cuda")
            from common.device import setup_cuda_fast_math
            setup_cuda_fast_math()
            rows = []
            numbers["gpu"] = {"device": device_name(dev), "batch": 4, "size": 512, "configs": []}
            for name, bf16, ck in (
                ("fp32, no checkpointing", False, False),
                ("fp32 + checkpointing", False, True),
                ("bf16 autocast + checkpointing", True, True),
                ("bf16 autocast, no checkpointing", True, False),
            ):
                torch.manual_seed(0)
                sd = sd14_random(dev)
                try:
                    r = bench(sd, dev, batch=4, size=512, bf16=bf16, checkpointing=ck, steps=args.steps or 20, warmup=3)
                    rows.append(f"| {name} | {r['steps_per_s']:.2f} | {r['peak_gib']:.1f} |")
                    numbers["gpu"]["configs"].append({"config": name, **r})
                except torch.OutOfMemoryError:
                    rows.append(f"| {name} | out of memory | - |")
                    numbers["gpu"]["configs"].append({"config": name, "out_of_memory": True})
                print(rows[-1])
                del sd
                torch.cuda.empty_cache()
            lines += [f"GPU, SD v1.4 shapes with random weights, batch 4 at 512x512, AdamW, {device_name(dev)}:", "",
                      "| config | steps/s | peak GiB |", "| --- | ---: | ---: |", *rows, "",
                      "Command: `python scripts/bench_p3.py --gpu --write`", ""]
    else:
        lines += ["GPU numbers (SD1.4 shapes, batch 4 at 512x512, fp32 vs bf16 + checkpointing): not measured yet; "
                  "run `python scripts/bench_p3.py --gpu --write` on a CUDA machine.", ""]
    body = "\n".join(lines)
    print(body)
    if args.json:
        write_text_atomic(args.json, json.dumps(numbers, indent=1) + "\n")
    if args.write:
        replace_section(REPO / "BENCHMARKS.md", "p3", body)


if __name__ == "__main__":
    main()
