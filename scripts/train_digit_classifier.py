#!/usr/bin/env python
r"""Train SvhnNet, the small classifier that scores generated digits, on the real images of one data set.

    python scripts/train_digit_classifier.py --data hw2_data/digits --extra mnistm   # checkpoints/svhn_classifier
    python scripts/train_digit_classifier.py --data hw2_data/digits --dataset mnistm \
        --widths 16,32,64 --epochs 4 --threads 1                                     # checkpoints/mnistm_classifier

Reads the course layout `<data>/<dataset>/{train,val,test}.csv` + `data/*.png` (28x28 RGB; write it
with scripts/prepare_digits.py, whose val.csv is a seeded 10% of the training arrays). Trains on
train.csv with augmentation meant for street-view digits (small random rotation/scale/shear/shift,
colour jitter, channel shuffles, inversion, greyscale, blur and noise; never a horizontal flip),
keeps the epoch with the best val.csv accuracy (ties: lower val loss), and only after that scores
test.csv once, as the reported number. `--extra mnistm` (or `svhn`) also draws a batch of that data
set's training images (`<data>/<extra>/train.csv`) into every step. Writes the checkpoint atomically
(fp16 when that changes no prediction on train+val) with a JSON sidecar holding the metrics.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.config import HelpFormatter, float_in, int_at_least
from common.datasets import CourseImageFolder, load_image, read_label_csv
from common.device import add_device_flag, pick_device
from common.errors import UserError, cli_main
from common.fileio import ensure_dir
from common.lightning_utils import EMA
from common.seeding import seed_everything
from scripts.digit_classifiers import SvhnNet, load_svhn_net, predict, save_svhn_net


def augment(images: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-image augmentation of uint8 (B,3,H,W) digits -> float (B,3,H,W) in [0, 255]."""
    b = images.shape[0]
    dev = images.device
    x = images.float() / 255.0

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, device=dev, generator=generator) * (hi - lo) + lo

    # geometry: rotation, scale, shear and a shift of a few pixels, border padding (no flips)
    s = strength
    ang = u(-12, 12) * s * math.pi / 180
    scale = 1 + u(-0.1, 0.1) * s
    aspect = 1 + u(-0.08, 0.08) * s
    shear = u(-0.15, 0.15) * s
    shift = u(-2.5, 2.5, 2) * s * 2 / images.shape[-1]
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3, device=dev)
    sx, sy = scale * aspect, scale / aspect
    theta[:, 0, 0] = cos / sx
    theta[:, 0, 1] = (-sin + shear * cos) / sx
    theta[:, 1, 0] = sin / sy
    theta[:, 1, 1] = (cos + shear * sin) / sy
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # colour: per-channel gain/offset, random channel order, greyscale, inversion
    x = x * u(0.75, 1.25, 3, 1, 1) + u(-0.12, 0.12, 3, 1, 1)
    perm = torch.argsort(torch.rand(b, 3, device=dev, generator=generator), dim=1)
    shuffle = (u(0, 1) < 0.5).view(b, 1, 1, 1)
    x = torch.where(shuffle, torch.gather(x, 1, perm.view(b, 3, 1, 1).expand_as(x)), x)
    grey = (u(0, 1) < 0.2).view(b, 1, 1, 1)
    x = torch.where(grey, x.mean(dim=1, keepdim=True).expand_as(x), x)
    invert = (u(0, 1) < 0.3).view(b, 1, 1, 1)
    x = torch.where(invert, 1 - x, x)

    # a little blur or noise, as generated digits can be soft or grainy
    blur = (u(0, 1) < 0.2).view(b, 1, 1, 1)
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = torch.where(blur, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    x = x + torch.randn(x.shape, device=dev, generator=generator) * u(0, 0.04, 1, 1, 1)
    return x.clamp(0, 1) * 255.0


def load_subset(root: Path, name: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random images of `<root>/<name>/train.csv` (all of them if fewer), as uint8 (N,3,28,28)."""
    base = root / name
    rows = read_label_csv(base / "train.csv")
    idx = np.random.default_rng(seed).permutation(len(rows))[:count]
    images = [load_image(base / "data" / rows[i][0], size=28) for i in sorted(idx)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([rows[i][1] for i in sorted(idx)], dtype=torch.long)
    return x, y


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model on uint8 images."""
    pred, probs = predict(model, images)
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels).item()
    return (pred == labels).float().mean().item(), loss


def train(args) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    root = Path(args.data)
    train_set = CourseImageFolder(root, args.dataset, "train")
    val_set = CourseImageFolder(root, args.dataset, "val")
    x_tr, y_tr = train_set.images.to(device), train_set.labels.to(device)
    x_extra = y_extra = None
    if args.extra != "none":
        x_extra, y_extra = load_subset(root, args.extra, args.extra_count, args.seed)
        x_extra, y_extra = x_extra.to(device), y_extra.to(device)
    print(f"{args.dataset}: {len(y_tr)} train, {len(val_set)} val" +
          (f"; {args.extra} extra: {len(y_extra)} images, {args.extra_batch} per step" if x_extra is not None else ""))

    model = SvhnNet(widths=args.widths, dropout=args.dropout).to(device)
    ema = EMA(model, args.ema).to(device) if args.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(y_tr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch * 2, total // 5)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    best = {"val_accuracy": -1.0, "val_loss": float("inf"), "epoch": 0}
    best_state = None
    history = []
    start, cpu_start = time.time(), time.process_time()
    bar = tqdm(range(1, args.epochs + 1), desc="train SvhnNet", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(y_tr), device=device, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            if x_extra is not None:
                j = torch.randint(len(y_extra), (args.extra_batch,), device=device, generator=gen)
                xb, yb = torch.cat([xb, x_extra[j]]), torch.cat([yb, y_extra[j]])
            inputs = model.preprocess(augment(xb, args.aug, gen))
            loss = F.cross_entropy(model(inputs), yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
        scored = ema.module if ema is not None else model
        acc, vloss = evaluate(scored, val_set.images, val_set.labels)
        history.append({"epoch": epoch, "train_loss": round(loss.item(), 4), "val_accuracy": acc,
                        "val_loss": round(vloss, 4)})
        if (acc, -vloss) > (best["val_accuracy"], -best["val_loss"]):
            best = {"val_accuracy": acc, "val_loss": vloss, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{acc:.3f}", best=f"{best['val_accuracy']:.3f}@{best['epoch']}")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start

    final = SvhnNet(widths=args.widths, dropout=args.dropout)
    final.load_state_dict(best_state)
    final.eval()
    return {"model": final, "best": best, "history": history, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "train_set": train_set, "val_set": val_set}


def choose_dtype(model: SvhnNet, images: torch.Tensor) -> torch.dtype | None:
    """fp16 storage when rounding the weights to fp16 changes no prediction on `images`, else fp32."""
    ref, _ = predict(model, images)
    rounded = SvhnNet(**model.config)
    rounded.load_state_dict({k: (v.half().float() if v.is_floating_point() else v)
                             for k, v in model.state_dict().items()})
    same, _ = predict(rounded, images)
    return torch.float16 if torch.equal(ref, same) else None


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="course digits root holding <dataset>/ (and <extra>/ for --extra)")
    p.add_argument("--dataset", choices=["svhn", "mnistm"], default="svhn", help="the data set to classify")
    p.add_argument("--out", default=None,
                   help="output .safetensors (default: checkpoints/<dataset>_classifier.safetensors)")
    p.add_argument("--extra", choices=["none", "mnistm", "svhn"], default="none",
                   help="also train on images of this other data set drawn into every batch")
    p.add_argument("--extra-count", type=int, default=5000, help="training images of --extra loaded")
    p.add_argument("--extra-batch", type=int, default=32, help="images of --extra added to every batch")
    p.add_argument("--epochs", type=int_at_least(1), default=60, help="passes over the training images")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per step")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float_in(0), default=5e-4, help="AdamW weight decay")
    share = float_in(0, 1, high_open=True)
    p.add_argument("--label-smoothing", type=share, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--dropout", type=share, default=0.3, help="dropout before the classifier layer")
    p.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[32, 64, 128],
                   help="channels of the three conv stages, e.g. 32,64,128")
    p.add_argument("--aug", type=float_in(0), default=1.0, help="strength of the geometric augmentation (0 = none)")
    p.add_argument("--ema", type=float_in(0, 1, high_open=True), default=0.0,
                   help="EMA decay of the scored weights (0 = no EMA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batch order")
    add_device_flag(p)
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-test", action="store_true", help="skip the final test.csv score (for model search)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"checkpoints/{args.dataset}_classifier.safetensors"
    if args.extra == args.dataset:
        raise UserError(f"--extra {args.extra}: already the --dataset; choose another data set or none")
    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out {args.out}: must end in .safetensors")
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if args.extra != "none" and (args.extra_count < 1 or args.extra_batch < 1):
        raise UserError("--extra-count and --extra-batch must be at least 1 with --extra")
    ensure_dir(Path(args.out).parent)  # fail now, not after minutes of training
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    result = train(args)
    model, best = result["model"], result["best"]
    train_set, val_set = result["train_set"], result["val_set"]
    dtype = choose_dtype(model, torch.cat([train_set.images, val_set.images]))
    metrics = {"val_accuracy": best["val_accuracy"], "val_loss": round(best["val_loss"], 4),
               "best_epoch": best["epoch"], "train_seconds": round(result["seconds"], 1),
               "train_cpu_seconds": round(result["cpu_seconds"], 1), "train_threads": torch.get_num_threads(),
               "weights_dtype": "float16" if dtype == torch.float16 else "float32",
               "history": result["history"]}
    train_config = {k: v for k, v in vars(args).items() if k not in ("out", "device", "threads", "no_test")}
    out = Path(args.out)
    save_svhn_net(out, model, train_config, metrics, dtype=dtype)
    print(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.4f} (val loss {best['val_loss']:.4f})")
    if not args.no_test:
        test_csv = Path(args.data) / args.dataset / "test.csv"
        if not test_csv.is_file():
            print(f"note: {test_csv} not found, no test accuracy", file=sys.stderr)
        else:
            test_set = CourseImageFolder(args.data, args.dataset, "test")
            saved = load_svhn_net(out)  # score exactly the weights that were written
            test_acc, _ = evaluate(saved, test_set.images, test_set.labels)
            metrics["test_accuracy"] = test_acc
            metrics["test_images"] = len(test_set)
            save_svhn_net(out, model, train_config, metrics, dtype=dtype)
            print(f"test accuracy {test_acc:.4f} on {len(test_set)} images of {test_csv}")
    print(f"wrote {out} ({metrics['weights_dtype']})")


if __name__ == "__main__":
    main()
