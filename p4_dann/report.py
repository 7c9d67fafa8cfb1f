#!/usr/bin/env python
"""Problem 4 report: train (or load) the three modes of every scenario, score them on the target TEST
split, write the accuracy table, and t-SNE plots of the DANN features for the course scenarios.

    python p4_dann/report.py --data hw2_data/digits --runs runs/p4 --out p4_report

For each scenario (source -> target) and mode (source / dann / target) the run folder is
<runs>/<source>_<target>/<mode>; a run with a best.safetensors is loaded, anything else is trained
there with p4_dann/train.py's defaults for the scenario (--retrain trains them all again). Training
time is the wall time measured when the run was trained (kept in <run>/train_time.json).

Writes to --out:
  p4_table.md                    target test accuracy: rows trained on source / DANN / trained on
                                 target, columns the scenarios; then wall time and val accuracies
  results.json                   every number in the table, with the device
  tsne_<src>_<tgt>_digit.png     t-SNE of DANN features of source and target val images, by digit
  tsne_<src>_<tgt>_domain.png    the same points, by domain
  tsne_*.png.json                what each plot shows, its checkpoint and the command
The test splits are only scored here, after training; nothing is chosen by them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from common.config import HelpFormatter, int_at_least
from common.errors import UserError, cli_main
from common.figure_info import command_line, write_figure_info
from common.fileio import atomic_path, check_writable, ensure_dir, write_text_atomic
from p4_dann.data import MODES, load_split
from p4_dann.model import SOURCE, load_dann, predict_logits

SCENARIOS = (("mnistm", "usps"), ("mnistm", "svhn"), ("mnist", "mnistm"))
COURSE_SCENARIOS = (("mnistm", "usps"), ("mnistm", "svhn"))
PRETTY = {"mnistm": "MNIST-M", "usps": "USPS", "svhn": "SVHN", "mnist": "MNIST"}
ROW_NAMES = {"source": "trained on source", "dann": "DANN (source + unlabelled target)",
             "target": "trained on target",
             "dann_nogrl": "ablation: DANN with the reversal switched off (--grl-max 0)"}
# report rows: the three modes of train.py, and an optional ablation that trains in dann mode without the GRL
ROWS = ("source", "dann", "target", "dann_nogrl")
ROW_TRAIN = {"source": ("source", []), "dann": ("dann", []), "target": ("target", []),
             "dann_nogrl": ("dann", ["--grl-max", "0"])}


def scenario_name(source: str, target: str) -> str:
    return f"{PRETTY[source]} → {PRETTY[target]}"


def parse_scenarios(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split("-")
        if len(parts) != 2 or tuple(parts) not in SCENARIOS:
            known = ", ".join(f"{s}-{t}" for s, t in SCENARIOS)
            raise UserError(f"--scenarios: unknown scenario {item!r} (choose from {known})")
        out.append((parts[0], parts[1]))
    if not out:
        raise UserError("--scenarios: no scenario given")
    return out


def train_argv(data: str, source: str, target: str, row: str, run_dir: Path, seed: int, extra: list[str],
               refresh_rate: int) -> list[str]:
    """train.py's flags for one report row: the scenario defaults, plus the row's flags and `extra`."""
    mode, row_flags = ROW_TRAIN[row]
    return ["--data", data, "--out", str(run_dir), "--source", source, "--target", target, "--mode", mode,
            "--seed", str(seed), "--refresh-rate", str(refresh_rate), *row_flags, *extra]


def train_run(argv: list[str], run_dir: Path, threads: int | None = None, jobs: int = 1) -> float:
    """Train one run; returns and records its wall time. threads=None trains in this process; a number
    trains in a child process (`python p4_dann/train.py`) limited to that many threads, so that several
    runs can share the machine (--jobs)."""
    from p4_dann.train import parse_config, train
    args, config, _ = parse_config(argv)  # bad flags fail here, before anything is deleted
    for stale in ("best.safetensors", "best.json", "model.safetensors", "model.json", "last.ckpt", "train.log"):
        (run_dir / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    if threads is None:
        train(args, config)
        threads = torch.get_num_threads()
    else:
        ensure_dir(run_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log_file = run_dir / "train.log"
        with open(log_file, "w") as log:
            code = subprocess.call([sys.executable, str(Path(__file__).resolve().parent / "train.py"), *argv],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            tail = log_file.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"training {run_dir} failed (exit {code}; {log_file}): {tail[0]}")
    seconds = time.perf_counter() - t0
    write_text_atomic(run_dir / "train_time.json", json.dumps(
        {"seconds": seconds, "threads": threads, "parallel_jobs": jobs, "argv": argv}, indent=2) + "\n")
    return seconds


def train_runs(todo: list[tuple[list[str], Path]], jobs: int, log=print) -> None:
    """Train every (argv, run_dir): one after the other in this process (jobs=1), or `jobs` child processes
    at a time, the machine's threads split between them (on 2 CPU cores two single-thread runs finish
    sooner than one two-thread run after the other: these small convolutions do not scale across threads)."""
    if jobs <= 1:
        for argv, run_dir in todo:
            log(f"== training {run_dir}")
            log(f"   trained in {train_run(argv, run_dir):.0f} s")
        return
    threads = max(1, torch.get_num_threads() // jobs)
    log(f"== training {len(todo)} runs, {jobs} at a time, {threads} thread(s) each (logs: <run>/train.log)")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(train_run, argv, run_dir, threads, jobs): run_dir for argv, run_dir in todo}
        for future in as_completed(futures):
            log(f"   {futures[future]}: trained in {future.result():.0f} s")


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, domain: int) -> float:
    return float((predict_logits(model, images, domain).argmax(1) == labels).float().mean())


def evaluate_run(run_dir: Path, target: str, splits: dict) -> dict:
    """Target test accuracy of a run's chosen weights, with its val metrics and training time."""
    ckpt = run_dir / "best.safetensors"
    model, config = load_dann(ckpt)
    test = splits[(target, "test")]
    result = {"checkpoint": str(ckpt), "test_acc": accuracy(model, test.images, test.labels, config["eval_domain"]),
              "test_count": len(test)}
    meta = (
        json.loads((run_dir / "best.json").read_text()).get("metrics", {}) if (run_dir / "best.json").is_file() else {}
    )
    result.update({k: meta[k] for k in ("val_source_acc", "val_target_acc", "global_step", "selected_on") if k in meta})
    tfile = run_dir / "train_time.json"
    timing = json.loads(tfile.read_text()) if tfile.is_file() else {}
    result["train_seconds"] = timing.get("seconds")
    result["train_threads"], result["train_parallel_jobs"] = timing.get("threads"), timing.get("parallel_jobs", 1)
    return result


def tsne_plots(model, eval_domain: int, source_val, target_val, out_prefix: Path, title: str,
               max_per_domain: int = 1000, seed: int = 0) -> list[Path]:
    """Two scatter plots of a 2-D t-SNE of the features of source and target val images: by digit, by domain."""
    import matplotlib
    from sklearn.manifold import TSNE
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    feats, digits, domains = [], [], []
    for k, (ds, domain) in enumerate(((source_val, SOURCE), (target_val, eval_domain))):
        idx = np.sort(rng.permutation(len(ds))[:max_per_domain])
        _, f = predict_logits(model, ds.images[idx], domain, return_features=True)
        feats.append(f.numpy())
        digits.append(ds.labels[idx].numpy())
        domains.append(np.full(len(idx), k))
    x = np.concatenate(feats).astype(np.float64)
    if len(x) < 5:
        raise UserError(f"t-SNE needs at least 5 images, got {len(x)}")
    emb = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed).fit_transform(x)
    digits, domains = np.concatenate(digits), np.concatenate(domains)
    names = [PRETTY.get(source_val.name, source_val.name), PRETTY.get(target_val.name, target_val.name)]
    paths = []
    for kind in ("digit", "domain"):
        fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
        if kind == "digit":
            for d in range(10):
                m = digits == d
                ax.scatter(emb[m, 0], emb[m, 1], s=4, color=plt.cm.tab10(d), label=str(d))
            ax.legend(markerscale=3, fontsize=8, loc="best", ncol=2, title="digit")
        else:
            for k, colour in ((0, "tab:blue"), (1, "tab:red")):
                m = domains == k
                ax.scatter(emb[m, 0], emb[m, 1], s=4, color=colour, alpha=0.6, label=f"{names[k]} ({m.sum()})")
            ax.legend(markerscale=3, fontsize=8, loc="best", title="domain")
        ax.set_title(f"{title}: DANN features by {kind}")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        path = Path(f"{out_prefix}_{kind}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def format_table(results: dict, scenarios: list[tuple[str, str]], modes: list[str]) -> str:
    cols = [f"{s}_{t}" for s, t in scenarios]
    head = "| target test accuracy | " + " | ".join(scenario_name(s, t) for s, t in scenarios) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]

    def cell(key, mode, fmt):
        r = results.get(key, {}).get(mode)
        return fmt(r) if r else "n/a"

    for mode in modes:
        lines.append(
            f"| {ROW_NAMES[mode]} | "
            + " | ".join(
                cell(
                    k,
                    mode,
                    lambda r, mode=mode: (f"**{100 * r['test_acc']:.2f}%**" if mode == "dann"
                                          else f"{100 * r['test_acc']:.2f}%"),
                )
                for k in cols
            )
            + " |"
        )
    lines.append(
        "| test images | "
        + " | ".join(str(next(iter(results.get(k, {}).values()), {}).get("test_count", "n/a")) for k in cols)
        + " |"
    )
    lines += ["", "Training wall time (s), and the validation accuracy the checkpoint was chosen on "
              "(source val for source/DANN, target val for target; target val in brackets for information):", "",
              "| mode | " + " | ".join(scenario_name(s, t) for s, t in scenarios) + " |", "|---|" + "---|" * len(cols)]

    def detail(r):
        t = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") is not None else "? s"
        sel = r.get("selected_on", "")
        v = r.get(sel)
        val = f"{sel.replace('val_', '').replace('_acc', '')} val {100 * v:.1f}%" if v is not None else ""
        extra = (
            f" [target val {100 * r['val_target_acc']:.1f}%]"
            if sel == "val_source_acc" and "val_target_acc" in r
            else ""
        )
        return f"{t}; {val}{extra}"

    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(cell(k, mode, detail) for k in cols) + " |")
    totals = []
    for k in cols:
        secs = [r.get("train_seconds") for r in results.get(k, {}).values()]
        totals.append(f"{sum(secs):.0f} s ({sum(secs) / 60:.1f} min)" if secs and None not in secs else "n/a")
    lines.append("| total | " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def run_report(data: str, runs: Path, out: Path, scenarios, modes, seed: int = 0, retrain: bool = False,
               extra: list[str] | None = None, tsne: bool = True, tsne_count: int = 1000, refresh_rate: int = 50,
               jobs: int = 1, log=print, command: str | None = None) -> dict:
    out = check_writable(out)
    check_writable(runs)
    splits: dict = {}

    def split(name, which):
        if (name, which) not in splits:
            splits[(name, which)] = load_split(data, name, which)
        return splits[(name, which)]

    for s, t in scenarios:  # every test/val split must load before hours of training start
        split(t, "test"), split(t, "val"), split(s, "val")
    todo = []
    for s, t in scenarios:
        for mode in modes:
            run_dir = runs / f"{s}_{t}" / mode
            # train_time.json is written when a run ends: without it, the run was interrupted (its best.json is
            # a mid-run one), and it is trained again
            if retrain or not ((run_dir / "best.safetensors").is_file() and (run_dir / "train_time.json").is_file()):
                todo.append((train_argv(data, s, t, mode, run_dir, seed, extra or [], refresh_rate), run_dir))
    train_runs(todo, jobs, log)
    results: dict = {}
    for s, t in scenarios:
        key = f"{s}_{t}"
        results[key] = {}
        for mode in modes:
            results[key][mode] = evaluate_run(runs / key / mode, t, splits)
            log(f"   {scenario_name(s, t)} {mode}: target test accuracy {100 * results[key][mode]['test_acc']:.2f}%")
    ensure_dir(out)
    table = format_table(results, scenarios, modes)
    write_text_atomic(out / "p4_table.md", table)
    from common.device import device_name
    payload = {"device": device_name(), "seed": seed, "results": results}
    if tsne and "dann" in modes:
        for s, t in scenarios:
            if (s, t) not in COURSE_SCENARIOS:
                continue
            model, config = load_dann(runs / f"{s}_{t}" / "dann" / "best.safetensors")
            paths = tsne_plots(model, config["eval_domain"], split(s, "val"), split(t, "val"),
                               out / f"tsne_{s}_{t}", scenario_name(s, t), tsne_count, seed)
            payload.setdefault("tsne", []).extend(str(p) for p in paths)
            for p, kind in zip(paths, ("digit", "domain")):
                write_figure_info(p, f"t-SNE of DANN features, {scenario_name(s, t)}: {tsne_count} source and "
                                     f"{tsne_count} target val images (at most), coloured by {kind}",
                                  command or command_line(__file__), checkpoint=runs / f"{s}_{t}" / "dann" /
                                  "best.safetensors", seed=seed)
            log(f"wrote {', '.join(str(p) for p in paths)}")
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2) + "\n")
    log(table)
    log(f"wrote {out / 'p4_table.md'} and {out / 'results.json'}")
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="course digits root with mnistm/, usps/, svhn/ (and mnist/)")
    p.add_argument("--runs", default="runs/p4", help="where runs are trained / loaded from")
    p.add_argument("--out", default="p4_report", help="folder for the table, results.json and the plots")
    p.add_argument("--scenarios", default=",".join(f"{s}-{t}" for s, t in SCENARIOS),
                   help="comma-separated source-target pairs")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of source,dann,target; add dann_nogrl for the ablation row "
                        "(dann mode with the gradient reversal switched off)")
    p.add_argument("--retrain", action="store_true", help="train every run again, even when it exists")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plots")
    p.add_argument("--tsne-count", type=int_at_least(3), default=1000, help="val images per domain in the t-SNE plots")
    p.add_argument("--train-args", default="", help="extra flags for every training run, e.g. '--max-steps 500'")
    p.add_argument("--refresh-rate", type=int, default=50, help="training progress bar refresh (steps)")
    p.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="train this many runs at once, each in its own process with threads/jobs threads "
                        "(2 on a 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training runs and the t-SNE")
    return p


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in ROWS:
            raise UserError(f"--modes: unknown mode {m!r} (choose from {', '.join(ROWS)})")
    if not modes:
        raise UserError("--modes: no mode given")
    return [m for m in ROWS if m in modes]


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_report(args.data, Path(args.runs), Path(args.out), parse_scenarios(args.scenarios), parse_modes(args.modes),
               args.seed, args.retrain, args.train_args.split(), not args.no_tsne, args.tsne_count, args.refresh_rate,
               args.jobs, command=command_line(__file__, argv))


if __name__ == "__main__":
    main()
