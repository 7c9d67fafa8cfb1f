#!/usr/bin/env python
"""One-shot GPU check: the timings that need a GPU, in one bounded run, into BENCHMARKS.md.

    bash scripts/gpu_check.sh                 # on a CUDA machine: about 5 minutes, at most 10
    python scripts/gpu_check.py --tiny --write ''   # CPU dry run at tiny sizes (what the test runs)

Runs, each as its own process with a time limit, so that one piece that hangs or fails cannot take the
others with it (a failed piece is reported with its last error line):
  1. `handin/2024/hw2_1.sh OUT` end to end: 1000 digit images, the most a course year asks for (the
     top-level hw2_1.sh follows the latest year, which asks for 500);
  2. i-CLEVR sampling, `p1_ddpm/infer.py --task iclevr`: 64 images (test.json + new_test.json) end to end;
  3. P1 training throughput: a short `p1_ddpm/train.py` run (bf16) on digits written by
     scripts/prepare_digits.py from ../shared/data/digits, or from generated arrays when that is absent.
     Only steady-state steps are timed (steps after a warm-up, not start-up or validation);
  4. P2: ten 256x256 noises, 50 DDIM steps, with a random face UNet of the course's width
     (scripts/bench_p2.py), batched and `bash hw2_2.sh` end to end;
  5. P3: the ControlNet training step with SD v1.4 shapes, batch 4 at 512x512, fp32 and bf16 with and
     without gradient checkpointing: steps/s and peak memory (scripts/bench_p3.py --gpu);
  6. P5: the textual-inversion training step with SD v1.4 shapes (fp32 vs bf16 + checkpointing) and one
     prompt's 25 images (scripts/bench_p5.py --sd14).
The whole check stays inside --budget seconds (default 570): every piece's limit is cut to what is left,
and a piece that would start with too little time left is reported as not run. The results go into
BENCHMARKS.md between the gpu_check markers, with the device name. Without CUDA it prints that it
needs a GPU and exits 0, leaving BENCHMARKS.md alone.

--tiny runs the same pieces on the CPU at tiny sizes (few steps, small images, the tiny SD components):
a check that every piece's commands and result parsing work, whose numbers mean nothing. It writes
nowhere unless --write is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.config import HelpFormatter, float_in
from common.paths import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
SHARED_DIGITS = SHARED_DATA / "digits"
SHARED_DOG = SHARED_DATA / "dreambooth" / "dog"
SECTION = "gpu_check"
NEEDS_GPU = "gpu_check: needs a CUDA GPU and none is visible here; nothing was run and BENCHMARKS.md is unchanged"
P1_TIMER = "_p1-train-timed"  # internal sub-command: p1_ddpm/train.py's main with a timing callback
MIN_START_S = 20  # a piece is not started with less time than this left in the budget


# --------------------------------------------------------------------------------- P1 throughput timer

def p1_train_timed(argv: list[str]) -> None:
    """Run p1_ddpm/train.py's own main(argv[1:]) with a callback that times its steady-state steps and
    writes {"images_per_s", "steps", "seconds", ...} to argv[0]. Start-up, the first steps (kernel
    selection, allocator warm-up) and the validation/export at the end are outside the timed span."""
    out_json, warmup, train_argv = Path(argv[0]), int(argv[1]), argv[2:]
    import torch
    from pytorch_lightning.callbacks import Callback

    import p1_ddpm.train as p1_train

    class StepTimer(Callback):
        def __init__(self):
            self.t0 = self.n0 = None
            self.images = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == warmup or step == trainer.max_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the queued kernels of the steps counted so far
                now = time.perf_counter()
            if step == warmup:
                self.t0, self.n0, self.images = now, step, 0
            elif self.t0 is not None:
                self.images += len(batch[0])
                if step == trainer.max_steps:
                    secs = now - self.t0
                    out_json.write_text(json.dumps({
                        "images_per_s": self.images / secs, "steps": step - self.n0, "seconds": secs,
                        "images": self.images, "warmup_steps": warmup, "precision": str(trainer.precision),
                    }))

    # train.py builds its Trainer with common.lightning_utils.make_trainer; add the timer to its callbacks
    make = p1_train.make_trainer

    def make_with_timer(*args, callbacks=(), **kwargs):
        return make(*args, callbacks=[*callbacks, StepTimer()], **kwargs)

    p1_train.make_trainer = make_with_timer
    p1_train.main(train_argv)


# ------------------------------------------------------------------------------------------ the runner

class Runner:
    """Runs the pieces' commands with time limits inside one overall budget and keeps their logs."""

    def __init__(self, work: Path, budget_s: float, tiny: bool):
        self.work, self.tiny = work, tiny
        self.deadline = time.monotonic() + budget_s
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = str(REPO) + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("MPLCONFIGDIR", str(work / "mplconfig"))
        # the limits are sized for a GPU; a tiny CPU run does less work but on a slow, maybe shared CPU
        self.cap_scale = 3.0 if tiny else 1.0
        if tiny:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cap_s: float) -> dict:
        """Run `cmd` (its own process group, so a timeout also ends what it started) for at most `cap_s`
        seconds or what is left of the budget. Returns {ok, wall, rc, timed_out, error, log}."""
        limit = min(cap_s * self.cap_scale, self.left())
        log = self.work / f"{name}.log"
        if limit < MIN_START_S:
            return {"ok": False, "wall": 0.0, "rc": None, "timed_out": False, "log": log,
                    "error": "not run: the time budget was spent"}
        print(f"[gpu_check] {name}: {shlex.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=limit), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
        wall = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        error = None
        if timed_out:
            error = f"timed out after {limit:.0f} s"
        elif rc != 0:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            error = f"failed (exit {rc}): {lines[-1][:200] if lines else 'no output'}"
        status = "ok" if error is None else error
        print(f"[gpu_check] {name}: {status} ({wall:.1f} s)", flush=True)
        if error is not None:
            print("".join(f"    {ln}\n" for ln in text.splitlines()[-15:]), end="", flush=True)
        return {"ok": error is None, "wall": wall, "rc": rc, "timed_out": timed_out, "error": error, "log": log}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def count_pngs(folder: Path) -> dict[str, int]:
    """PNG files per sub-folder ('.' for the folder itself)."""
    counts: dict[str, int] = {}
    for p in sorted(folder.rglob("*.png")) if folder.is_dir() else []:
        key = str(p.parent.relative_to(folder))
        counts[key] = counts.get(key, 0) + 1
    return counts


def row(check: str, result: str, wall: float | None) -> dict:
    return {"check": check, "result": result, "wall": wall}


def failed(check: str, r: dict, what: str = "") -> dict:
    return row(check, (what + ": " if what else "") + r["error"], r["wall"] or None)


# ----------------------------------------------------------------------------------------------- pieces

def piece_hw2_1(run: Runner, py: str) -> dict:
    out = run.work / "hw2_1_out"
    script = REPO / "handin" / "2024" / "hw2_1.sh"
    extra = ["--steps", "2"] if run.tiny else []
    if script.is_file():
        cmd, label = ["bash", str(script), str(out), *extra], "`bash handin/2024/hw2_1.sh OUT` end to end"
    else:  # before the per-year hand-in folders existed: the same command the 2024 script runs
        # --layout: that tree's infer.py predates --year (today's still accepts it)
        cmd = [py, str(REPO / "p1_ddpm" / "infer.py"), "--layout", "2024", "--out", str(out), *extra]
        label = "`p1_ddpm/infer.py --layout 2024` end to end"
    r = run.run("hw2_1", cmd, 120)
    if not r["ok"]:
        return failed(label, r)
    counts = count_pngs(out)
    total = sum(counts.values())
    parts = ", ".join(f"{k}/ {v}" for k, v in counts.items())
    ok = "" if total == 1000 else " (expected 1000)"
    return row(label, f"{total} PNGs ({parts}){ok}, process start and model load included", r["wall"])


def piece_iclevr(run: Runner, py: str) -> dict:
    out = run.work / "iclevr_out"
    cmd = [py, str(REPO / "p1_ddpm" / "infer.py"), "--task", "iclevr", "--out", str(out)]
    if run.tiny:
        cmd += ["--steps", "2"]
    label = "i-CLEVR sampling, `p1_ddpm/infer.py --task iclevr` end to end"
    r = run.run("iclevr", cmd, 90)
    if not r["ok"]:
        return failed(label, r)
    counts = {k: v for k, v in count_pngs(out).items() if k != "."}  # the grids sit at the top
    total = sum(counts.values())
    steps = 2 if run.tiny else 50
    return row(label, f"{total} images of 64x64 ({', '.join(f'{k}.json {v}' for k, v in counts.items())}), "
                      f"{steps} DDIM steps with guidance, PNGs and grids written", r["wall"])


def write_synthetic_digits(folder: Path, n: int) -> None:
    """mnistm.npz and svhn_partial.npz of random 28x28 RGB images with labels, as prepare_digits reads them
    (with test arrays, so the svhn split is not cut at image 900): throughput does not depend on content."""
    import numpy as np
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mnistm", "svhn_partial"):
        arrays = {}
        for split, count in (("train", n), ("test", max(1, n // 10))):
            arrays[f"x_{split}"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
            arrays[f"y_{split}"] = rng.integers(0, 10, count)
        np.savez(folder / f"{name}.npz", **arrays)


def piece_p1_train(run: Runner, py: str) -> dict:
    batch, steps, warmup = (8, 4, 1) if run.tiny else (128, 300, 50)
    precision = "fp32" if run.tiny else "bf16"
    label = f"P1 training throughput, `p1_ddpm/train.py` ({precision}, batch {batch})"
    real = (SHARED_DIGITS / "mnistm.npz").is_file() and (SHARED_DIGITS / "svhn_partial.npz").is_file()
    npz = SHARED_DIGITS if real and not run.tiny else run.work / "digits_npz"
    limit = 64 if run.tiny else 6000
    if npz != SHARED_DIGITS:
        write_synthetic_digits(npz, limit)
    data = run.work / "digits"
    r = run.run("p1_data", [py, str(REPO / "scripts" / "prepare_digits.py"), "--npz-dir", str(npz), "--out",
                            str(data), "--datasets", "mnistm,svhn", "--limit", str(limit)], 120)
    if not r["ok"]:
        return failed(label, r, "preparing the data")
    timing = run.work / "p1_train.json"
    cmd = [py, str(Path(__file__).resolve()), P1_TIMER, str(timing), str(warmup), "--data", str(data),
           "--out", str(run.work / "p1_run"), "--max-steps", str(steps), "--val-every", str(steps),
           "--limit-val-batches", "2", "--batch-size", str(batch), "--precision", precision, "--quiet"]
    if run.tiny:
        cmd += ["--accelerator", "cpu"]
    r = run.run("p1_train", cmd, 150)
    if not r["ok"]:
        return failed(label, r)
    t = read_json(timing)
    if t is None:
        return row(label, "the run finished but its step timer reported nothing", r["wall"])
    source = "real MNIST-M + SVHN (first 6000 of each)" if npz == SHARED_DIGITS else "generated images"
    return row(label, f"**{t['images_per_s']:.0f} images/s** ({t['steps']} steps after {t['warmup_steps']} warm-up "
                      f"steps; data: {source}); the whole run with start-up and validation", r["wall"])


def piece_p2(run: Runner, py: str) -> dict:
    count, size, steps = (2, 32, 2) if run.tiny else (10, 256, 50)
    label = f"P2: {count} noises at {size}x{size}, {steps} DDIM steps (random face UNet, `scripts/bench_p2.py`)"
    numbers = run.work / "p2.json"
    cmd = [py, str(REPO / "scripts" / "bench_p2.py"), "--count", str(count), "--size", str(size),
           "--steps", str(steps), "--skip-single", "--e2e", "--write", "", "--json", str(numbers)]
    cmd += ["--device", "cpu", "--base-channels", "32"] if run.tiny else ["--device", "cuda"]
    r = run.run("p2", cmd, 180)
    if not r["ok"]:
        return failed(label, r)
    n = read_json(numbers) or {}
    if "e2e_s" not in n:
        return row(label, "the benchmark finished but wrote no end-to-end time", r["wall"])
    return row(label, f"sampling the batch of {count}: {n['batched_s']:.1f} s; **`bash hw2_2.sh` end to end: "
                      f"{n['e2e_s']:.1f} s** (process start, UNet.pt load, PNGs; {n['precision']})", r["wall"])


def piece_p3(run: Runner, py: str) -> dict:
    label = "P3: ControlNet training step, SD v1.4 shapes, batch 4 at 512x512 (`scripts/bench_p3.py --gpu`)"
    numbers = run.work / "p3.json"
    cmd = [py, str(REPO / "scripts" / "bench_p3.py"), "--json", str(numbers)]
    if run.tiny:
        label = "P3: ControlNet training step, tiny SD on the CPU (`scripts/bench_p3.py`)"
        cmd += ["--steps", "2"]
    else:
        cmd += ["--gpu", "--steps", "10"]
    r = run.run("p3", cmd, 240)
    if not r["ok"]:
        return failed(label, r)
    n = read_json(numbers) or {}
    if run.tiny:
        tiny = n.get("cpu_tiny") or {}
        return row(label, f"{tiny.get('s_per_step', float('nan')):.2f} s/step", r["wall"])
    configs = (n.get("gpu") or {}).get("configs") or []
    if not configs:
        return row(label, "the benchmark finished but measured no GPU step", r["wall"])
    parts = [f"{c['config']}: out of memory" if c.get("out_of_memory") else
             f"{c['config']}: **{c['steps_per_s']:.2f} it/s**, {c['peak_gib']:.1f} GiB peak" for c in configs]
    return row(label, "; ".join(parts), r["wall"])


def training_photos(run: Runner) -> Path:
    """The shared DreamBooth dog when present, else five generated photos (speed does not depend on them)."""
    if SHARED_DOG.is_dir() and not run.tiny:
        return SHARED_DOG
    import numpy as np
    from PIL import Image
    folder = run.work / "photos"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    side = 64 if run.tiny else 512
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def piece_p5(run: Runner, py: str) -> dict:
    label = ("P5: textual-inversion step, SD v1.4 shapes, batch 4 at 512x512, and one prompt's 25 images "
             "(`scripts/bench_p5.py --sd14`)")
    numbers = run.work / "p5.json"
    cmd = [py, str(REPO / "scripts" / "bench_p5.py"), "--write", "", "--json", str(numbers),
           "--photos", str(training_photos(run))]
    if run.tiny:
        label = "P5: textual-inversion step and generation, tiny SD on the CPU (`scripts/bench_p5.py`)"
        cmd += ["--device", "cpu", "--steps", "2", "--warmup", "1", "--gen-steps", "2", "--gen-count", "2",
                "--gen-batch", "2"]
    else:
        cmd += ["--sd14", "--device", "cuda", "--steps", "10", "--warmup", "2"]
    r = run.run("p5", cmd, 300)
    if not r["ok"]:
        return failed(label, r)
    n = read_json(numbers) or {}
    if not n.get("fp32"):
        return row(label, "the benchmark finished but wrote no numbers", r["wall"])

    def setup(name, key):
        s = n[key]
        peak = f", {s['peak_gib']:.1f} GiB peak" if s.get("peak_gib") is not None else ""
        return f"{name}: **{s['steps_per_s']:.2f} it/s**{peak}"
    parts = [setup("fp32", "fp32"), setup("bf16 + checkpointing", "bf16_checkpointing")]
    g = n.get("generation")
    if g:
        parts.append(f"{g['images']} images, {g['steps']} DDIM steps with guidance ({g['precision']}): "
                     f"**{g['seconds']:.1f} s**")
    return row(label, "; ".join(parts), r["wall"])


PIECES = (piece_hw2_1, piece_iclevr, piece_p1_train, piece_p2, piece_p3, piece_p5)


def render(rows: list[dict], device: str, total_s: float, budget_s: float, tiny: bool) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## One-shot GPU check (scripts/gpu_check.sh)", "",
        f"Device: {device}. Run {when}, {total_s:.0f} s in all (budget {budget_s:.0f} s).",
    ]
    if tiny:
        lines.append("**Tiny CPU dry run (`--tiny`): checks that the pieces run; the numbers mean nothing.**")
    lines += ["", "| check | result | wall (s) |", "| --- | --- | ---: |"]
    for r in rows:
        wall = f"{r['wall']:.1f}" if r["wall"] else "-"
        lines.append(f"| {r['check']} | {r['result'].replace('|', '/')} | {wall} |")
    lines += ["", "Wall times are whole processes (Python start-up, imports, model building included); the "
              "it/s, images/s and bench timings inside them are the scripts' own steady-state measurements. "
              "Random weights stand in for the trained ones where speed does not depend on them.",
              "", "Command: `bash scripts/gpu_check.sh`", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU dry run at tiny sizes (for the tests)")
    p.add_argument("--budget", type=float_in(0, low_open=True), default=570.0, help="seconds for the whole check")
    p.add_argument("--only", default=None, help="comma-separated pieces to run (default: all): "
                                               + ",".join(f.__name__[len('piece_'):] for f in PIECES))
    p.add_argument("--write", default=None,
                   help="markdown file to put the section into ('' = none; default BENCHMARKS.md, or none with --tiny)")
    p.add_argument("--logs", default=None, help="keep every piece's output and files in this folder")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [P1_TIMER]:
        p1_train_timed(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    names = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    pieces = [f for f in PIECES if not names or f.__name__[len("piece_"):] in names]
    unknown = set(names) - {f.__name__[len("piece_"):] for f in PIECES}
    if unknown:
        print(f"gpu_check: unknown --only piece(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    import torch
    if not args.tiny and not torch.cuda.is_available():
        print(NEEDS_GPU)
        return 0
    write = args.write if args.write is not None else ("" if args.tiny else str(REPO / "BENCHMARKS.md"))
    from common.device import device_name
    device = device_name("cpu" if args.tiny else "cuda")
    py = sys.executable
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.logs) if args.logs else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = Runner(work, args.budget, args.tiny)
        rows = []
        for piece in pieces:
            try:
                rows.append(piece(run, py))
            except Exception as e:  # a bug in one piece's set-up or parsing must not lose the others' numbers
                rows.append(row(piece.__name__[len("piece_"):], f"failed in gpu_check.py: {type(e).__name__}: {e}",
                                None))
                print(f"[gpu_check] {piece.__name__}: {type(e).__name__}: {e}", flush=True)
    body = render(rows, device, time.perf_counter() - t0, args.budget, args.tiny)
    print(body)
    if write:
        from scripts.benchmarks import replace_section
        replace_section(write, SECTION, body)
        print(f"updated {write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
