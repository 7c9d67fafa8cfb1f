#!/usr/bin/env python
r"""Train the project's own i-CLEVR judge (a multi-label CNN) on rendered images.

    python p1_ddpm/render_iclevr.py --out runs/iclevr/data --n 24000 --seed 0
    python p1_ddpm/render_iclevr.py --out runs/iclevr/heldout --n 3000 --seed 1 --prefix heldout
    python scripts/train_iclevr_judge.py --data runs/iclevr/data --heldout runs/iclevr/heldout \
        --out checkpoints/iclevr_judge.safetensors

Trains with binary cross-entropy on the multi-hot labels (light Gaussian pixel noise and small colour
jitter, so generated images with slight artefacts are still read), keeps the epoch with the best
accuracy on a validation split cut from --data, and only then scores --heldout (images rendered with
another seed) once: that is the judge's reported accuracy (the lab's top-k definition). Writes the
checkpoint atomically, in fp16 when that changes no top-k prediction on the validation split.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.checkpoint import save_checkpoint
from common.config import HelpFormatter, float_in, int_at_least
from common.device import add_precision_flag, autocast, autocast_dtype
from common.errors import UserError, cli_main
from common.fileio import check_writable
from common.seeding import seed_everything
from p1_ddpm.iclevr_data import ICLEVRDataset, split_names
from p1_ddpm.iclevr_judge import JUDGE_KIND, MultiLabelJudge, judge_scores, to_input, topk_accuracy


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x in [-1, 1]: per-image brightness/contrast jitter and Gaussian noise of random strength."""
    b = x.shape[0]
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2
    bias = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    return (x * gain + bias + sigma * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def accuracy(net, images: torch.Tensor, cond: torch.Tensor) -> float:
    net.eval()
    hits, total = topk_accuracy(judge_scores(net, images), cond)
    return hits / max(total, 1)


def top_k_sets(net, images, cond) -> list[tuple[int, ...]]:
    scores = judge_scores(net, images)
    return [tuple(sorted(s.topk(int(y.sum())).indices.tolist())) for s, y in zip(scores, cond)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--data", required=True, help="rendered (or real) training folder: images + train.json + objects.json"
    )
    p.add_argument("--heldout", default=None, help="a second rendered folder, scored once at the end")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--epochs", type=int_at_least(1), default=4, help="passes over the rendered images")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="images per step")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3, help="AdamW learning rate")
    p.add_argument("--width", type=int, default=32, help="base channel width of the CNN")
    p.add_argument("--val-fraction", type=float_in(0, 1, low_open=True, high_open=True), default=0.05,
                   help="share of the images held out to choose the epoch")
    add_precision_flag(p, default="fp32", what="the judge's training forward (on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, split and batch order")
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: --out must end in .safetensors")
    check_writable(out.parent)
    seed_everything(args.seed)
    t0 = time.time()
    train_names, val_names = split_names(args.data, args.val_fraction, args.seed)
    train = ICLEVRDataset(args.data, train_names)
    val = ICLEVRDataset(args.data, val_names)
    heldout = ICLEVRDataset(args.heldout) if args.heldout else None
    if len(train.objects) != 24:
        raise UserError(f"{args.data}/objects.json: expected 24 classes, got {len(train.objects)}")
    print(f"data: {len(train)} train, {len(val)} val, {len(heldout) if heldout else 0} held-out "
          f"({time.time() - t0:.0f} s to load)", flush=True)

    net = MultiLabelJudge(width=args.width)
    cpu = torch.device("cpu")
    amp_dtype = autocast_dtype(cpu, args.precision)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(train) // args.batch_size
    total = max(1, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(args.seed)
    best, best_state, history = -1.0, None, []
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=g)
        te = time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(to_input(train.images[idx]), g)
            with autocast(cpu, amp_dtype):
                logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), train.cond[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                print(f"epoch {epoch} step {i}/{steps_per_epoch} loss {loss.item():.4f}", flush=True)
        acc = accuracy(net, val.images, val.cond)
        history.append({"epoch": epoch, "val_acc": acc, "seconds": time.time() - te})
        print(f"epoch {epoch}: val accuracy {acc:.4f} ({time.time() - te:.0f} s)", flush=True)
        if acc > best:
            best, best_state = acc, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()

    # fp16 storage only when it changes no top-k set on the validation split
    half = MultiLabelJudge(width=args.width)
    half.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v for k, v in best_state.items()})
    half.eval()
    lossless = top_k_sets(net, val.images, val.cond) == top_k_sets(half, val.images, val.cond)
    metrics = {"val_acc": best, "train_images": len(train), "val_images": len(val), "epochs": args.epochs,
               "history": history, "train_seconds": round(time.time() - t0, 1), "fp16": lossless}
    if heldout is not None:
        metrics["heldout_acc"] = accuracy(half if lossless else net, heldout.images, heldout.cond)
        metrics["heldout_images"] = len(heldout)
    save_checkpoint(out, best_state, JUDGE_KIND, {"model": net.config}, metrics,
                    dtype=torch.float16 if lossless else None)
    print(f"wrote {out}: val accuracy {best:.4f}" +
          (f", held-out accuracy {metrics['heldout_acc']:.4f}" if heldout is not None else "") +
          f" ({'fp16' if lossless else 'fp32'}, {metrics['train_seconds']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
