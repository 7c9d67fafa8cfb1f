#!/usr/bin/env python
r"""Copy a trained checkpoint into checkpoints/ for shipping: optional fp16 storage, extra metrics merged in.

    python scripts/ship_checkpoint.py runs/p1/model.safetensors checkpoints/p1_ddpm.safetensors \
        --fp16 --metrics bench.json --note "trained with ..."
    python scripts/ship_checkpoint.py runs/mini_cn/controlnet checkpoints/mini_controlnet --fp16 \
        --metrics scores.json --note "..."          # a ControlNet folder (p3_controlnet/train.py's OUT/controlnet)

A ControlNet folder is written as a folder again (config.json, the weights) with its metrics and note in
INFO_FILE beside them; hw2_3.sh reads it as it reads train.py's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.checkpoint import read_checkpoint, save_checkpoint, sidecar_json
from common.config import HelpFormatter
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic

INFO_FILE = "shipped.json"


def extra_metrics(args) -> dict:
    """--metrics FILE's keys, and --note as "note"."""
    metrics = {}
    if args.metrics:
        try:
            metrics.update(json.loads(Path(args.metrics).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args.metrics}: not a readable JSON file ({e})") from None
    if args.note:
        metrics["note"] = args.note
    return metrics


def ship_controlnet(src: Path, dst: Path, args) -> None:
    from p3_controlnet.model import load_controlnet, save_controlnet
    metrics = extra_metrics(args)  # a bad --metrics file fails before anything is written
    net = load_controlnet(src)
    save_controlnet(net, dst, dtype=torch.float16 if args.fp16 else None)
    write_text_atomic(dst / INFO_FILE, json.dumps({"source": str(src), "fp16": bool(args.fp16),
                                                   "metrics": metrics}, indent=2) + "\n")
    print(f"wrote {dst} (ControlNet folder, {'fp16' if args.fp16 else 'as stored'})")


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", help="the trained weights: a .safetensors file, or a ControlNet folder")
    p.add_argument("dst", help="where to write the shipped copy (a file, or a folder for a ControlNet)")
    p.add_argument("--fp16", action="store_true", help="store floating-point tensors in fp16")
    p.add_argument("--metrics", default=None, help="JSON file whose keys are added to the metrics")
    p.add_argument("--note", default=None, help="free text stored under metrics.note")
    args = p.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        return ship_controlnet(src, Path(args.dst), args)
    if not src.is_file():
        raise UserError(f"{src}: checkpoint not found")
    with safe_open(str(src), framework="pt") as f:
        kind = (f.metadata() or {}).get("kind")
    state, config = read_checkpoint(src, kind)
    metrics = {}
    if sidecar_json(src).is_file():
        metrics.update(json.loads(sidecar_json(src).read_text()).get("metrics", {}))
    metrics.update(extra_metrics(args))
    save_checkpoint(args.dst, state, kind, config, metrics, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.dst} ({kind}, {'fp16' if args.fp16 else 'as stored'})")


if __name__ == "__main__":
    main()
