#!/usr/bin/env python
"""Problem 2 benchmark: DDIM with the course-width face UNet, all noises in one batch versus one at a time.

    python scripts/bench_p2.py                                  # ten 256x256 noises, 50 steps (the hand-in's work)
    python scripts/bench_p2.py --steps 2                        # the same images, fewer steps (slow CPUs)
    python scripts/bench_p2.py --device cuda --e2e              # also time `bash hw2_2.sh` end to end

The UNet has the course network's width (113.7 M parameters) and random weights (speed does not depend on
them), exact fp32 unless --precision bf16 / --tf32. Both timings come from the same run and process, so
their ratio is meaningful; `--e2e` adds the wall time of `bash hw2_2.sh` (process start, loading a
random UNet.pt from disk, sampling, PNG writing), the number the course's 5-minute limit applies to.
The table is printed and written into BENCHMARKS.md between the bench_p2 markers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.config import HelpFormatter, int_at_least, int_in
from common.device import (
    add_device_flag,
    add_precision_flag,
    autocast_dtype,
    channels_last_pays,
    device_name,
    pick_device,
    set_tf32,
)
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic
from common.images import to_uint8
from p2_ddim.infer import sample_faces_ddim
from p2_ddim.model import FaceUNet
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_e2e(model: FaceUNet, noises: torch.Tensor, args) -> float:
    """Wall time of `bash hw2_2.sh` on noise files and a UNet.pt written to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "noise").mkdir()
        for i, x in enumerate(noises):
            torch.save(x[None].clone(), tmp / "noise" / f"{i:02d}.pt")
        torch.save(model.state_dict(), tmp / "UNet.pt")
        cmd = ["bash", str(REPO / "hw2_2.sh"), str(tmp / "noise"), str(tmp / "out"), str(tmp / "UNet.pt"),
               "--steps", str(args.steps), "--device", args.device, "--precision", args.precision,
               "--batch-size", str(args.count), "--quiet"] + (["--tf32"] if args.tf32 else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        n = len(list((tmp / "out").glob("*.png")))
        if n != len(noises):
            raise RuntimeError(f"hw2_2.sh wrote {n} images, expected {len(noises)}")
    return wall


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--count", type=int_at_least(1), default=10, help="number of noises (images)")
    p.add_argument("--size", "--resolution", type=int, default=256, help="image side (a multiple of 32)")
    p.add_argument("--steps", type=int_in(1, 1000), default=50, help="DDIM steps")
    p.add_argument("--base-channels", type=int, default=128, help="UNet width (128 = the course network)")
    add_device_flag(p)
    add_precision_flag(p, default="fp32", what="the UNet (as p2_ddim/infer.py, exact fp32 by default)")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls (off: exact fp32)")
    p.add_argument("--skip-single", action="store_true", help="time only the batched run")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                   help="also time bash hw2_2.sh end to end (default: on CUDA only)")
    p.add_argument("--write", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noises")
    p.add_argument("--json", default=None, help="also write the timings to this JSON file (scripts/gpu_check.py)")
    args = p.parse_args(argv)
    if args.size < 32 or args.size % 32:
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    device = pick_device(args.device)
    args.device = str(device)
    amp = autocast_dtype(device, args.precision)
    set_tf32(args.tf32)  # after autocast_dtype: --tf32 is the last word on TF32
    torch.manual_seed(args.seed)
    model = FaceUNet(args.base_channels).eval()  # PyTorch's default initialisation: random weights
    nparams = sum(q.numel() for q in model.parameters())
    noises = torch.randn(args.count, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    gpu_model = model.to(device)
    if channels_last_pays(device):
        gpu_model = gpu_model.to(memory_format=torch.channels_last)
    # one untimed forward first (cuDNN / oneDNN set-up, allocator), so neither timed run pays for it
    sample_faces_ddim(gpu_model, noises[:1], [0], steps=1, device=device, amp_dtype=amp)
    common = dict(steps=args.steps, device=device, amp_dtype=amp, progress=True)
    idx = list(range(args.count))
    rows = []
    numbers = {"device": device_name(device), "count": args.count, "size": args.size, "steps": args.steps,
               "precision": "bf16" if amp is not None else "fp32", "parameters": nparams}
    batched, t_batched = timed(lambda: sample_faces_ddim(gpu_model, noises, idx, batch_size=args.count,
                                                         desc="batched", **common), device)
    rows.append(("all at once", args.count, t_batched))
    numbers["batched_s"] = t_batched
    print(f"batched: {t_batched:.2f} s", flush=True)
    ratio_line = ""
    if not args.skip_single and args.count > 1:
        single, t_single = timed(lambda: sample_faces_ddim(gpu_model, noises, idx, batch_size=1,
                                                           desc="one at a time", **common), device)
        rows.append(("one at a time", 1, t_single))
        numbers["one_at_a_time_s"] = t_single
        print(f"one at a time: {t_single:.2f} s", flush=True)
        diff = (to_uint8(batched, "minmax").astype(int) - to_uint8(single, "minmax").astype(int))
        ratio_line = (f"\n\nOne at a time / batched: **{t_single / t_batched:.2f}x** "
                      f"(largest pixel difference between the two: {abs(diff).max()} of 255).")
    e2e = args.e2e if args.e2e is not None else device.type == "cuda"
    e2e_line = ""
    if e2e:
        wall = run_e2e(model.cpu(), noises, args)
        numbers["e2e_s"] = wall
        e2e_line = (f"\n\n`bash hw2_2.sh` end to end ({args.count} noise files, random UNet.pt loaded from disk, "
                    f"PNGs written): **{wall:.1f} s** wall (course limit 5 min; target under 30 s on one H100).")
        print(f"hw2_2.sh end to end: {wall:.1f} s", flush=True)

    table = "\n".join(f"| {name} | {bs} | {secs:.2f} | {secs / args.count:.2f} | "
                      f"{1000 * secs / (args.count * args.steps):.1f} |" for name, bs, secs in rows)
    cmd = "python scripts/bench_p2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = (
        f"## P2: DDIM with the face UNet (scripts/bench_p2.py)\n\n"
        f"Device: {device_name(device)}. UNet width {args.base_channels} ({nparams / 1e6:.1f} M parameters, "
        f"random weights), {args.count} noises of {args.size}x{args.size}, "
        f"{args.steps} DDIM step{'s' if args.steps != 1 else ''}, "
        f"{'bf16' if amp is not None else 'fp32'}{' + TF32' if args.tf32 else ' (exact)'}.\n\n"
        f"| run | batch size | seconds | s / image | ms / image / step |\n|---|---|---|---|---|\n{table}"
        f"{ratio_line}{e2e_line}\n\nCommand: `{cmd.strip()}`\n"
    )
    print(body)
    if args.json:
        write_text_atomic(args.json, json.dumps(numbers, indent=1) + "\n")
    if args.write:
        replace_section(args.write, "bench_p2", body)
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
