#!/usr/bin/env python
"""Copy a trained checkpoint into checkpoints/ for shipping: optional fp16 storage, extra metrics merged in.

    python scripts/ship_checkpoint.py runs/p1/model.safetensors checkpoints/p1_ddpm.safetensors \
        --fp16 --metrics bench.json --note "trained with ..."
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.checkpoint import read_checkpoint, save_checkpoint, sidecar_json
from common.errors import UserError, cli_main


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--fp16", action="store_true", help="store floating-point tensors in fp16")
    p.add_argument("--metrics", default=None, help="JSON file whose keys are added to the metrics")
    p.add_argument("--note", default=None, help="free text stored under metrics.note")
    args = p.parse_args(argv)
    src = Path(args.src)
    if not src.is_file():
        raise UserError(f"{src}: checkpoint not found")
    with safe_open(str(src), framework="pt") as f:
        kind = (f.metadata() or {}).get("kind")
    state, config = read_checkpoint(src, kind)
    metrics = {}
    if sidecar_json(src).is_file():
        metrics.update(json.loads(sidecar_json(src).read_text()).get("metrics", {}))
    if args.metrics:
        try:
            metrics.update(json.loads(Path(args.metrics).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{args.metrics}: not a readable JSON file ({e})") from None
    if args.note:
        metrics["note"] = args.note
    save_checkpoint(args.dst, state, kind, config, metrics, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.dst} ({kind}, {'fp16' if args.fp16 else 'as stored'})")


if __name__ == "__main__":
    main()
