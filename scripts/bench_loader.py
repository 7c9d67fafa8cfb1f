#!/usr/bin/env python
"""Training data loaders for BENCHMARKS.md: images/s of P1's digits loader, the i-CLEVR loader and P3's Fill50k
loader at --num-workers 0, 1 and 2, measured side by side (interleaved rounds) in one run, and the i-CLEVR
data set's start-up (lazy: labels and a file check; eager: every image decoded, as before issue 20).

    python scripts/bench_loader.py [--rounds 3] [--workers 0,1,2] [--no-write]

Each loader is the trainer's own: the DataModule's train_dataloader() (common.step_batches.step_batch_loader,
given a stand-in for the Trainer of a one-process run from step 0, so it runs over data epochs and splits the
batches between its workers as in training), at the trainer's default batch size. The data is generated into
a temporary folder: digits in the course layout from ../shared/data/digits (scripts/prepare_digits.py),
i-CLEVR stand-ins (p1_ddpm/render_iclevr.py, scaled to the lab's 320x240 RGBA files unless --iclevr-64) and
Fill50k (p3_controlnet/make_fill50k.py, 512 px). "first batch" is the time from asking for the loader to its
first batch (worker start-up included); images/s counts the batches after it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common.config import HelpFormatter, int_at_least
from common.device import device_name
from common.paths import SHARED_DATA
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]
SHARED_DIGITS = SHARED_DATA / "digits"


def make_data(root: Path, digits: int, iclevr: int, fill: int, lab_size: bool) -> dict[str, Path]:
    from p1_ddpm.render_iclevr import main as render
    from p3_controlnet.make_fill50k import main as make_fill
    from scripts.prepare_digits import main as prepare
    paths = {"iclevr": root / "iclevr", "fill50k": root / "fill50k"}
    if SHARED_DIGITS.is_dir():
        paths["digits"] = root / "digits"
        prepare(["--npz-dir", str(SHARED_DIGITS), "--out", str(paths["digits"]), "--limit", str(digits)])
    else:
        print(f"{SHARED_DIGITS} not found: no digits loader", file=sys.stderr)
    render(["--out", str(paths["iclevr"]), "--n", str(iclevr), "--seed", "0", "--labels-from", "random"])
    if lab_size:  # as the lab's files: 320x240 RGBA, which the loader converts and resizes to 64x64
        from PIL import Image
        for f in sorted((paths["iclevr"] / "images").glob("*.png")):
            with Image.open(f) as im:
                big = im.convert("RGBA").resize((320, 240), Image.BICUBIC)
            big.save(f)
    make_fill(["--out", str(paths["fill50k"]), "--n", str(fill), "--size", "512", "--seed", "0"])
    return paths


def data_module(name: str, path: Path, workers: int):
    """The trainer's DataModule for `name` at the trainer's default batch size, set up."""
    if name == "digits":
        from p1_ddpm.data import DigitsDataModule
        from p1_ddpm.train import TASK_CONFIGS
        dm = DigitsDataModule(str(path), batch_size=TASK_CONFIGS["digits"].batch_size, num_workers=workers)
    elif name == "iclevr":
        from p1_ddpm.iclevr_data import ICLEVRDataModule
        from p1_ddpm.train import TASK_CONFIGS
        dm = ICLEVRDataModule(str(path), batch_size=TASK_CONFIGS["iclevr"].batch_size, num_workers=workers)
    else:
        from p3_controlnet.data import Fill50kDataModule
        from p3_controlnet.train import P3TrainConfig
        c = P3TrainConfig()
        dm = Fill50kDataModule(path, size=c.size, batch_size=c.batch_size, val_count=c.val_count,
                               num_workers=workers)
    dm.setup("fit")
    return dm


def batch_images(batch) -> int:
    if isinstance(batch, dict):
        return len(batch["target"])
    return len(batch[0])


def measure(dm, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next `batches` batches) of dm's training loader."""
    # what step_batch_loader reads of a Trainer: a one-process run of 1 + `batches` steps from step 0
    dm.trainer = SimpleNamespace(max_steps=1 + batches, accumulate_grad_batches=1, global_step=0, global_rank=0,
                                 world_size=1)
    start = time.perf_counter()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        n += batch_images(next(it))
    rate = n / (time.perf_counter() - start)
    del it, loader  # ends persistent workers
    return first, rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each measures every loader once)")
    p.add_argument("--workers", default="0,1,2", help="--num-workers values to compare")
    p.add_argument("--digits", type=int, default=1500, help="digits per data set and split written (--limit)")
    p.add_argument("--iclevr", type=int, default=1500, help="i-CLEVR images rendered")
    p.add_argument("--iclevr-64", action="store_true",
                   help="keep the renders at 64 px (default: scaled to the lab's 320x240 RGBA files)")
    p.add_argument("--fill", type=int, default=240, help="Fill50k items at 512 px")
    p.add_argument("--batches", type=int, default=None,
                   help="batches timed per measurement (default: 40 digits, 16 i-CLEVR, 12 Fill50k)")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads of the main process")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    batches = {"digits": 40, "iclevr": 16, "fill50k": 12}
    if args.batches is not None:
        batches = dict.fromkeys(batches, args.batches)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        paths = make_data(Path(tmp), args.digits, args.iclevr, args.fill, not args.iclevr_64)
        names = [n for n in ("digits", "iclevr", "fill50k") if n in paths]
        modules = {(n, w): data_module(n, paths[n], w) for n in names for w in workers}
        firsts: dict[tuple[str, int], list[float]] = {k: [] for k in modules}
        rates: dict[tuple[str, int], list[float]] = {k: [] for k in modules}
        ratios: dict[tuple[str, int], list[float]] = {k: [] for k in modules}
        for r in range(args.rounds):
            for n in names:
                got = {}
                for w in workers:
                    first, rate = measure(modules[n, w], batches[n])
                    firsts[n, w].append(first)
                    rates[n, w].append(rate)
                    got[w] = rate
                for w in workers:
                    ratios[n, w].append(got[w] / got[workers[0]])
                print(f"round {r + 1}: {n} " + ", ".join(f"{w} workers {got[w]:.0f} img/s" for w in workers),
                      flush=True)

        # i-CLEVR start-up: the data set as the trainer builds it (lazy) against decoding every image up front
        from p1_ddpm.iclevr_data import ICLEVRDataset
        lazy, eager = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            ds = ICLEVRDataset(paths["iclevr"])
            lazy.append(time.perf_counter() - t)
            t = time.perf_counter()
            ds.images  # noqa: B018  (decodes them all)
            eager.append(time.perf_counter() - t + lazy[-1])
        n_iclevr = len(ds)

    med = statistics.median
    rows = ["| loader | batch | --num-workers | first batch (s) | images/s | vs 0 workers |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    batch_size = {}
    for n in names:
        batch_size[n] = modules[n, workers[0]].batch_size
        for w in workers:
            rows.append(f"| {n} | {batch_size[n]} | {w} | {med(firsts[n, w]):.2f} | {med(rates[n, w]):.0f} | "
                        f"{med(ratios[n, w]):.2f}x |")
    per_image = (med(eager) - med(lazy)) / n_iclevr
    startup = (f"i-CLEVR start-up, {n_iclevr} images: lazy (labels + file check, what the trainer does now) "
               f"{med(lazy):.2f} s; decoding every image up front (before) {med(eager):.2f} s, "
               f"{per_image * 1e3:.2f} ms an image, about {per_image * 18009:.0f} s for the lab's 18009.")
    table = "\n".join(rows)
    print(table)
    print(startup)
    if args.no_write:
        return
    iclevr_files = "64 px" if args.iclevr_64 else "rendered at 64 px, stored as the lab's 320x240 RGBA PNGs"
    body = f"""## Training data loaders (scripts/bench_loader.py)

Command: `nice -n 5 python scripts/bench_loader.py --rounds {args.rounds}`: medians of {args.rounds} interleaved
rounds, each measuring every loader at every `--num-workers`; "vs 0 workers" is the median of each round's own
ratio. Device: {device_name()}. A loaded machine: 2 cores shared with a long training run, so the absolute
numbers are low and noisy, and more workers than free cores cannot help; quote the ratios, measured side by side.

Each loader is the trainer's own `train_dataloader()` at its default batch size, for a one-process run from
step 0. Data: digits {args.digits} per data set and split (28 px, decoded into memory at start-up, so a batch
is indexing and collating); i-CLEVR stand-ins, {args.iclevr} images ({iclevr_files}; decoded and resized when
read); Fill50k, {args.fill} items at 512 px (two PNGs decoded per item, returned as float32: 6 MB an item that a
worker hands to the main process through shared memory). "first batch": seconds from asking for the loader to
its first batch (worker start-up included).

{table}

{startup}
"""
    replace_section(REPO / "BENCHMARKS.md", "bench_loader", body)
    print(f"wrote the bench_loader section of {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
