#!/usr/bin/env python
"""i-CLEVR numbers for BENCHMARKS.md: the own judge on held-out renders, the shipped DDPM's samples on
the lab's label lists (own judge, the lab's top-k accuracy), a guidance sweep on validation label lists,
and sampling time.

    python scripts/bench_iclevr.py [--seeds 0,1,2] [--no-write]

Validation label lists (for the guidance sweep): lists drawn from ../shared/data/iclevr/train.json
(or random 1-3 object lists when it is absent), never from test.json / new_test.json, whose scores
are reported at the inference defaults only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter, comma_list, finite_float, int_at_least
from common.device import device_name
from common.images import to_uint8
from p1_ddpm.iclevr_data import load_label_lists, multi_hot
from p1_ddpm.iclevr_judge import OWN_JUDGE, judge_scores, load_own_judge, topk_accuracy
from p1_ddpm.infer import ICLEVR_ASSETS, ICLEVR_CHECKPOINT, ICLEVR_DEFAULTS
from p1_ddpm.model import load_unet, schedule_of
from p1_ddpm.render_iclevr import OBJECTS, SHARED_TRAIN_JSON, label_lists_from, random_label_lists, render
from p1_ddpm.samplers import sample_conditional_images
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]


def score(judge, images_uint8_nhwc: np.ndarray, cond: torch.Tensor) -> float:
    hits, total = topk_accuracy(judge_scores(judge, torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2)), cond)
    return hits / total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=str(ICLEVR_CHECKPOINT), help="the i-CLEVR DDPM to time and score")
    p.add_argument("--judge", default=str(OWN_JUDGE), help="the judge that scores the samples")
    p.add_argument("--seeds", type=comma_list(int_at_least(0)), default="42,1,2",
                   help="sampling seeds for the test label lists (first: infer's default)")
    p.add_argument("--heldout", type=int_at_least(1), default=2000, help="held-out renders to score the judge on")
    p.add_argument("--val-lists", type=int_at_least(1), default=128,
                   help="validation label lists for the guidance sweep")
    p.add_argument("--guidances", type=comma_list(finite_float), default="1.5,3,5",
                   help="guidance scales of the sweep")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="CPU threads (the timing line says how many)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config = load_unet(args.checkpoint)
    judge = load_own_judge(args.judge)
    ab = schedule_of(config)
    d = ICLEVR_DEFAULTS
    rows = []

    # 1. the judge on renders it never saw (another seed than its training data)
    rng = np.random.default_rng([12345, 7])
    lists = label_lists_from(SHARED_TRAIN_JSON, args.heldout, rng) if SHARED_TRAIN_JSON.is_file() \
        else random_label_lists(args.heldout, rng)
    imgs = render(lists, seed=12345)
    cond = torch.stack([multi_hot(v, OBJECTS) for v in lists])
    judge_acc = score(judge, imgs, cond)
    rows.append(f"| own judge on {args.heldout} held-out renders (seed 12345) | {judge_acc:.4f} |")

    # 2. guidance sweep on validation label lists (drawn like the training lists)
    rng = np.random.default_rng([777, 1])
    val_lists = label_lists_from(SHARED_TRAIN_JSON, args.val_lists, rng) if SHARED_TRAIN_JSON.is_file() \
        else random_label_lists(args.val_lists, rng)
    val_cond = torch.stack([multi_hot(v, OBJECTS) for v in val_lists])
    sweep = []
    for w in args.guidances:
        x = sample_conditional_images(model, val_cond, range(len(val_cond)), ab, 0, d["sampler"], d["steps"], w,
                                      d["eta"])
        sweep.append(
            f"| validation lists ({args.val_lists}), guidance {w:g} | {score(judge, to_uint8(x), val_cond):.4f} |"
        )

    # 3. the lab's label lists at infer.py's defaults, several seeds; and the sampling time
    test_rows, timing = [], None
    for name in ("test", "new_test"):
        lists, cond = load_label_lists(ICLEVR_ASSETS / f"{name}.json", config.get("objects", OBJECTS))
        accs = []
        for s in args.seeds:
            t0 = time.perf_counter()
            x = sample_conditional_images(model, cond, range(len(cond)), ab, s, d["sampler"], d["steps"],
                                          d["guidance"], d["eta"])
            dt = time.perf_counter() - t0
            timing = timing or dt
            accs.append(score(judge, to_uint8(x), cond))
        test_rows.append(f"| {name}.json (32 lists), seeds {','.join(map(str, args.seeds))} | "
                         + ", ".join(f"{a:.4f}" for a in accs) + f" (mean {np.mean(accs):.4f}) |")

    meta = json.loads(Path(args.checkpoint).with_suffix(".json").read_text()).get("metrics", {})
    jmeta = json.loads(Path(args.judge).with_suffix(".json").read_text()).get("metrics", {})
    body = "\n".join(
        [
            "## i-CLEVR (multi-label conditional DDPM, rendered data)",
            "",
            "Command: `python scripts/bench_iclevr.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
            "",
            f"Device: {device_name()}. Images: `p1_ddpm/render_iclevr.py` renders (the real i-CLEVR images and the "
            "lab's "
            "evaluator weights are not available), so every accuracy below is the lab's top-k accuracy judged by this "
            "project's own CNN (`checkpoints/iclevr_judge.safetensors`), not by the lab's evaluator.",
            "",
            f"Sampler: {d['sampler']} {d['steps']} steps, eta {d['eta']}, guidance {d['guidance']} "
            "(infer.py defaults; guidance chosen on "
            "validation lists, not on the test files).",
            "",
            "| what | accuracy |",
            "| --- | --- |",
            *rows,
            *sweep,
            *test_rows,
            "",
            f"Training: DDPM {meta.get('train_note', 'see checkpoints/p1_iclevr.json')}; "
            f"judge {jmeta.get('train_seconds', '?')} s on {jmeta.get('train_images', '?')} renders "
            f"(validation accuracy {jmeta.get('val_acc', float('nan')):.4f}).",
            f"Sampling the 32 images of test.json: {timing:.1f} s on this CPU ({args.threads} thread(s), fp32).",
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(REPO / "BENCHMARKS.md", "iclevr", body)
        print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
