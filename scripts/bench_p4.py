#!/usr/bin/env python
"""Problem 4 benchmark: one run of p4_dann/report.py (train the three modes of the three scenarios, score
them on the target test splits), the shipped checkpoints, and `bash hw2_dann.sh` end to end.

    python scripts/bench_p4.py --data hw2_data/digits --runs runs/p4/bench --retrain --ship

  1. report.run_report: the accuracy table (target TEST split), training wall time per run, t-SNE plots.
  2. --ship: the DANN runs of the course scenarios become checkpoints/p4_dann_{usps,svhn}.safetensors,
     stored in fp16 when fp16 weights give exactly the fp32 predictions on the target val split
     (else fp32); their test accuracy is re-measured from the shipped file.
  3. `bash hw2_dann.sh <data>/<target>/data OUT.csv` on every image of the course folder (train, val
     and test images: what the course script is given), wall time; the test rows are scored.
The tables are printed and written into BENCHMARKS.md between the bench_p4 markers.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint import save_checkpoint
from common.config import HelpFormatter, int_at_least
from common.datasets import read_label_csv
from common.device import device_name
from common.errors import UserError, cli_main
from common.fileio import write_text_atomic
from p4_dann.data import load_split
from p4_dann.model import CHECKPOINT_KIND, load_dann, predict_logits
from p4_dann.report import COURSE_SCENARIOS, SCENARIOS, parse_modes, parse_scenarios, run_report, scenario_name
from scripts.benchmarks import replace_section

REPO = Path(__file__).resolve().parents[1]


def ship(run_dir: Path, dst: Path, data: str, target: str, report_row: dict, note: str) -> dict:
    """Copy a DANN run's chosen weights to `dst`, in fp16 when that changes no target-val prediction."""
    model, config = load_dann(run_dir / "best.safetensors")
    val = load_split(data, target, "val")
    test = load_split(data, target, "test")
    domain = config["eval_domain"]
    fp32_val = predict_logits(model, val.images, domain).argmax(1)
    half = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model16 = copy.deepcopy(model)  # the same network with fp16-rounded weights
    model16.load_state_dict(half)
    same = bool(torch.equal(predict_logits(model16, val.images, domain).argmax(1), fp32_val))
    dtype = torch.float16 if same else None
    metrics = json.loads((run_dir / "best.json").read_text()).get("metrics", {})
    metrics.update(stored_as="fp16" if same else "fp32", fp16_same_val_predictions=same,
                   train_seconds=report_row.get("train_seconds"), note=note)
    save_checkpoint(dst, model.state_dict(), CHECKPOINT_KIND, config, metrics, dtype=dtype)
    shipped, _ = load_dann(dst)
    acc = float((predict_logits(shipped, test.images, domain).argmax(1) == test.labels).float().mean())
    metrics["test_acc"] = acc
    metrics["test_count"] = len(test)
    save_checkpoint(dst, model.state_dict(), CHECKPOINT_KIND, config, metrics, dtype=dtype)
    return {"path": str(dst.relative_to(REPO)) if dst.is_relative_to(REPO) else str(dst), "dtype": metrics["stored_as"],
            "bytes": dst.stat().st_size, "test_acc": acc, "test_acc_fp32": report_row["test_acc"]}


def time_entry_point(data: str, target: str, checkpoint: Path) -> dict:
    folder = Path(data) / target / "data"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{target}_pred.csv"
        cmd = ["bash", str(REPO / "hw2_dann.sh"), str(folder), str(out), "--checkpoint", str(checkpoint)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise UserError(f"hw2_dann.sh failed on {folder}: {r.stderr.strip().splitlines()[-1:]}")
        pred = dict(read_label_csv(out))
    test = dict(read_label_csv(Path(data) / target / "test.csv"))
    correct = sum(pred[n] == y for n, y in test.items())
    return {"images": len(pred), "seconds": seconds, "test_acc": correct / len(test), "test_count": len(test)}


def section(payload: dict, ship_rows: dict, entry_rows: dict, table: str, command: str) -> str:
    lines = ["## P4: DANN domain adaptation (scripts/bench_p4.py)", "",
             f"Device: {payload['device']}. Seed {payload['seed']}. Every number below comes from the one run of "
             "`p4_dann/report.py` that this command made; accuracies are on the target TEST split, which nothing "
             "was chosen on.", "", table.rstrip(), ""]
    runs = [r for rows in payload["results"].values() for r in rows.values() if r.get("train_seconds")]
    if runs:
        jobs = max(r.get("train_parallel_jobs") or 1 for r in runs)
        threads = max(r.get("train_threads") or 1 for r in runs)
        lines += [
            f"Wall times: each run trained with {threads} thread(s), {jobs} run(s) at a time on this machine.",
            "",
        ]
    lines += ["Model choice: source-only and DANN runs keep the checkpoint with the best SOURCE val accuracy (no "
              "target label is looked at); target-only runs keep the best target val accuracy. The training "
              "settings (augmentation, steps, EMA) were tuned by hand on the target val splits, which in a strict "
              "unsupervised setting would not be labelled. SVHN: only 1083 real images exist here, so its "
              "columns are a small proxy (810 train / 90 val / 183 test images), not the course's SVHN numbers.", ""]
    if ship_rows:
        lines += [
            "Shipped checkpoints (the DANN runs above):",
            "",
            "| file | stored as | size | target test accuracy (shipped file) | same run, fp32 |",
            "|---|---|---|---|---|",
        ]
        for r in ship_rows.values():
            lines.append(f"| `{r['path']}` | {r['dtype']} | {r['bytes'] / 1024:.0f} KiB | {100 * r['test_acc']:.2f}% | "
                         f"{100 * r['test_acc_fp32']:.2f}% |")
        lines.append("")
    if entry_rows:
        lines += ["`bash hw2_dann.sh <data>/<target>/data OUT.csv` end to end (process start, model load, every image "
                  "of the course folder, csv):", "",
                  "| target | images | seconds | ms / image | accuracy on the test rows |", "|---|---|---|---|---|"]
        for t, r in entry_rows.items():
            lines.append(f"| {t} | {r['images']} | {r['seconds']:.1f} | {1000 * r['seconds'] / r['images']:.2f} | "
                         f"{100 * r['test_acc']:.2f}% ({r['test_count']}) |")
        lines.append("")
    if payload.get("tsne"):
        lines.append(
            "t-SNE plots: " + ", ".join(f"`{Path(p).name}`" for p in payload["tsne"]) + " (in the report's --out)."
        )
        lines.append("")
    lines.append(f"Command: `{command}`")
    return "\n".join(lines)


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="course digits root (mnistm, usps, svhn, mnist)")
    p.add_argument("--runs", default="runs/p4/bench", help="run folders (trained there when missing or --retrain)")
    p.add_argument("--out", default="p4_report", help="the report's folder (table, results.json, t-SNE plots)")
    p.add_argument("--scenarios", default=",".join(f"{s}-{t}" for s, t in SCENARIOS),
                   help="comma-separated SOURCE-TARGET scenarios")
    p.add_argument("--modes", default="source,dann,target",
                   help="comma-separated training modes (p4_dann/train.py --mode)")
    p.add_argument("--retrain", action="store_true", help="train every run again")
    p.add_argument(
        "--ship", action="store_true", help="write checkpoints/p4_dann_{usps,svhn}.safetensors from the runs"
    )
    p.add_argument("--ship-dir", default=str(REPO / "checkpoints"), help="where --ship writes the DANN checkpoints")
    p.add_argument("--skip-entry", action="store_true", help="do not time hw2_dann.sh")
    p.add_argument("--train-args", default="", help="extra flags for every training run")
    p.add_argument("--jobs", type=int_at_least(1), default=1, help="runs trained at once (report.py --jobs)")
    p.add_argument("--write", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training runs")
    args = p.parse_args(argv)
    scenarios, modes = parse_scenarios(args.scenarios), parse_modes(args.modes)
    command = "python scripts/bench_p4.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    payload = run_report(args.data, Path(args.runs), Path(args.out), scenarios, modes, args.seed, args.retrain,
                         args.train_args.split(), tsne=True, jobs=args.jobs)
    payload["device"] = device_name()
    table = (Path(args.out) / "p4_table.md").read_text()
    ship_rows, entry_rows = {}, {}
    for s, t in scenarios:
        if (s, t) not in COURSE_SCENARIOS or "dann" not in modes:
            continue
        ckpt = Path(args.ship_dir) / f"p4_dann_{t}.safetensors"
        if args.ship:
            note = f"DANN {scenario_name(s, t)}, made by: {command}"
            ship_rows[t] = ship(Path(args.runs) / f"{s}_{t}" / "dann", ckpt, args.data, t,
                                payload["results"][f"{s}_{t}"]["dann"], note)
            print(f"shipped {ship_rows[t]}")
        if not args.skip_entry and ckpt.is_file():
            entry_rows[t] = time_entry_point(args.data, t, ckpt)
            print(f"hw2_dann.sh {t}: {entry_rows[t]}")
    body = section(payload, ship_rows, entry_rows, table, command)
    print(body)
    write_text_atomic(Path(args.out) / "bench_p4.json",
                      json.dumps({**payload, "ship": ship_rows, "entry": entry_rows}, indent=2) + "\n")
    if args.write:
        replace_section(args.write, "bench_p4", body)
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
