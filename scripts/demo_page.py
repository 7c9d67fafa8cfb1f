#!/usr/bin/env python
"""One HTML page with every figure and number of a demo run or of a folder of full-size report outputs.

    python scripts/demo_page.py demo_out                                # `make demo` ends with this
    python scripts/demo_page.py RUN_ROOT --title "HW2, full runs" [--out RUN_ROOT/index.html]

Reads only files that are already there (no model runs) and writes ROOT/index.html: a summary table (one row
per problem: status, headline number, time), then one section per problem in course order with its figures
(each captioned from its FIG.png.json sidecar: what it shows, weights, sampler, steps, seed, and the exact
command), its numbers as tables (each naming the grader that scored it), and the commands of its steps.
A problem with nothing in ROOT gets a short section saying what it needs. Images are linked relatively,
and the page has no scripts or external fonts, so the folder can be opened offline or copied elsewhere.

Layout of ROOT (what `make demo` writes; for full-size runs point each report's --out / --json here):
  steps/NAME.json            one per demo step (scripts/demo_step.py): command, seconds, or why it was skipped
  p1_figs/*.png              python p1_ddpm/report.py --out ROOT/p1_figs
  p1_accuracy.json           python scripts/evaluate_digits.py --folder OUT --json ROOT/p1_accuracy.json
  iclevr/*_grid.png, iclevr/denoise.png     python p1_ddpm/infer.py --task iclevr --out ROOT/iclevr --denoise ...
  iclevr/score_{test,new_test}.json         python scripts/evaluate_iclevr.py ... --json ROOT/iclevr/score_test.json
  p2_figs/{eta_grid,slerp,lerp}.png         python p2_ddim/experiments.py {eta-grid,interpolate} --out ROOT/p2_figs/..
  p2/*.png                   bash hw2_2.sh NOISE_DIR ROOT/p2 UNet.pt (the first ten are shown)
  p2_mse.json                python scripts/evaluate_mse.py --pred OUT --gt GT --json ROOT/p2_mse.json
  p3/*.png, p3_figs/*.png    bash hw2_3.sh ... ROOT/p3 ...;
                             python p3_controlnet/report.py --out ROOT/p3_figs/two_circles.png
                             (the mini SD by default: checkpoints/mini_sd + checkpoints/mini_controlnet)
  p3_scores.json             python scripts/evaluate_controlnet.py --pred ROOT/p3 --prompts P --source S
                             [--gt T --clip-weights ...] --json ROOT/p3_scores.json (the offline Fill50k judge's
                             "fill50k_judge" block; CLIP / FID / colour IoU when their inputs were given)
  p4/{usps,svhn}_accuracy.json              python scripts/evaluate_labels.py --pred ... --json ...
  p4_report/                 python p4_dann/report.py --out ROOT/p4_report (results.json, tsne_*.png)
  p5_zeroshot/               python p5_personalization/clip_zeroshot.py --out ROOT/p5_zeroshot
  p5_gen_{ti,joint}/, p5_scores_{ti,joint}.json   SD v1.4: bash hw2_ti.sh ... ROOT/p5_gen_ti ...;
                             python scripts/evaluate_ti.py ... --report ROOT/p5_scores_ti.json (CLIP scores)
  p5_gen_{ti,init_word}/, p5_scores_{ti,init_word}.json   the mini SD (default): images OUT/<entry>/<prompt>/*.png
                             of assets/mini_ti/input{,_init_word}.json; python scripts/evaluate_ti.py --judge fill50k
                             ... --report ROOT/p5_scores_ti.json (the offline judge: concept shown or not)
  p5_figs/ti_prompts.png     python p5_personalization/report.py ... --out ROOT/p5_figs/ti_prompts.png
Anything missing is left out; a JSON file that is not valid, or lacks a number the page needs, is an
error naming the file.
"""
from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.config import HelpFormatter
from common.errors import UserError, cli_main
from common.fileio import read_json, write_text_atomic


@dataclass
class Section:
    """What one problem contributes to the page."""
    figures: list = field(default_factory=list)   # (path, info dict)
    tables: list = field(default_factory=list)    # (title, header, rows, note)
    galleries: list = field(default_factory=list)  # (title, [paths])
    notes: list = field(default_factory=list)  # one-line remarks under the tables
    headline: str = ""


def need(data, key: str, path: Path, kind=None):
    """data[key], or a UserError naming the file when it is not there (or not of `kind`)."""
    if not isinstance(data, dict) or key not in data:
        raise UserError(f"{path}: missing {key!r} (not the JSON this page expects)")
    value = data[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UserError(f"{path}: {key!r} should be {getattr(kind, '__name__', 'a number')}, got {value!r}")
    return value


NUMBER = (int, float)


def need_share(data, key: str, path: Path) -> float | None:
    """data[key]: a number, or None where the judge had nothing to score (no item of that kind)."""
    value = need(data, key, path)
    if value is not None and (not isinstance(value, NUMBER) or isinstance(value, bool)):
        raise UserError(f"{path}: {key!r} should be a number or null, got {value!r}")
    return value


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def pct_or_dash(x) -> str:
    return "—" if x is None else pct(x)


def figures(root: Path, folder: str, known: dict[str, str], pattern: str = "*.png") -> list:
    """PNGs of root/folder with a FIG.png.json sidecar, plus the `known` ones without one (caption from `known`)."""
    base = root / folder
    if not base.is_dir():
        return []
    found = []
    for png in sorted(base.glob(pattern)):
        side = Path(f"{png}.json")
        if side.is_file():
            info = read_json(side, "figure sidecar")
            if not isinstance(info, dict):
                raise UserError(f"{side}: expected a JSON object")
            need(info, "what", side, str)
        elif png.name in known:
            info = {"what": known[png.name]}
        else:
            continue
        found.append((png, info))
    order = list(known)
    found.sort(key=lambda f: (order.index(f[0].name) if f[0].name in order else len(order), f[0].name))
    return found


def first_images(folder: Path, count: int) -> list[Path]:
    return sorted(folder.glob("*.png"))[:count] if folder.is_dir() else []


def load(path: Path):
    return read_json(path, "score file") if path.is_file() else None


# ---- one function per problem: what is in ROOT -> Section ------------------------------------------------

TITLES = {"mnistm": "MNIST-M", "svhn": "SVHN", "usps": "USPS", "mnist": "MNIST"}
SHORT_GRADERS = {"CourseLeNet": "course LeNet", "SvhnNet": "our SVHN net", "MnistmNet": "our MNIST-M net"}


def p1_section(root: Path) -> Section:
    s = Section(figures=figures(root, "p1_figs", {
        "grid_mnistm.png": "MNIST-M samples, 10x10: rows digits 0-9",
        "grid_svhn.png": "SVHN samples, 10x10: rows digits 0-9",
        "reverse_process.png": "reverse process of the first images, t = 999 ... 0"}))
    path = root / "p1_accuracy.json"
    report = load(path)
    if report is not None:
        sets = need(report, "sets", path, dict)
        rows, heads = [], []
        for name, r in sets.items():
            acc = need(r, "accuracy", path, NUMBER)
            grader = r.get("grader") or r.get("classifier", "?")
            ckpt = r.get("checkpoint")
            rows.append([name, need(r, "total", path, int), need(r, "correct", path, int), pct(acc),
                         grader + (f" — {ckpt}" if ckpt else "")])
            heads.append(f"{TITLES.get(name, name)} {pct(acc)} ({SHORT_GRADERS.get(r.get('classifier'), '?')})")
        rows.append(["mean", "", "", pct(need(report, "mean_accuracy", path, NUMBER)), ""])
        s.tables.append(("Digit accuracy of the generated images (hw2_1.sh, 2024 layout)",
                         ["folder", "images", "correct", "accuracy", "scored by"], rows, path))
        s.headline = ", ".join(heads)
    return s


def iclevr_section(root: Path) -> Section:
    s = Section(figures=figures(root, "iclevr", {
        "test_grid.png": "test.json: one generated scene per label list",
        "new_test_grid.png": "new_test.json: one generated scene per label list",
        "denoise.png": "denoising process, noise to image"}))
    rows, heads, judges = [], [], set()
    for name in ("test", "new_test"):
        path = root / "iclevr" / f"score_{name}.json"
        r = load(path)
        if r is None:
            continue
        acc = need(r, "accuracy", path, NUMBER)
        found = f"{need(r, 'hits', path, int)}/{need(r, 'total', path, int)}"
        rows.append([f"{name}.json", r.get("image_count", ""), found, pct(acc),
                     f"{r.get('grader', r.get('judge', '?'))} — {r.get('checkpoint', '')}"])
        heads.append(f"{name} {pct(acc)}")
        judges.add({"own": "our judge", "lab": "lab evaluator"}.get(r.get("judge"), "?"))
    if rows:
        s.tables.append(("Objects found in the generated scenes (top-k accuracy)",
                         ["label file", "images", "objects found", "accuracy", "scored by"], rows, None))
        s.headline = ", ".join(heads) + f" ({', '.join(sorted(judges))})"
    return s


def p2_section(root: Path) -> Section:
    s = Section(figures=figures(root, "p2_figs", {
        "eta_grid.png": "DDIM eta grid", "slerp.png": "slerp interpolation", "lerp.png": "lerp interpolation"}))
    path = root / "p2_mse.json"
    r = load(path)
    if r is not None:
        per = need(r, "per_image", path, dict)
        mean = need(r, "mean", path, NUMBER)
        rows = [[name, f"{need(per, name, path, NUMBER):.3f}"] for name in sorted(per)]
        rows.append(["mean", f"{mean:.3f}"])
        s.tables.append(("MSE of hw2_2.sh's faces against GT/ (pixels 0-255; the course's pass mark: mean under 20)",
                         ["image", "MSE"], rows, path))
        s.headline = f"mean MSE {mean:.3f} ({'under' if mean < 20 else 'over'} the pass mark 20)"
    s.galleries.append(("hw2_2.sh outputs", first_images(root / "p2", 10)))
    return s


P3_METRICS = {"colour_iou": ("colour IoU (own: circle mask by colour vs the target's)", "{:.3f}"),
              "clip_score": ("CLIP score (100 x cosine, prompt vs image)", "{:.2f}"),
              "clip_cosine": ("CLIP cosine", "{:.4f}"),
              "fid": ("FID against the targets", "{:.2f}"),
              "sam2_iou": ("SAM2 IoU", "{:.3f}"),
              "sam2_iou_x_clip": ("SAM2 IoU x CLIP", "{:.3f}")}


# The judge block of evaluate_controlnet.py: (share key, its item-count key, label, format)
P3_JUDGE = (("iou_mean", "iou_items", "mask IoU vs the control (union of the circles found)", "{:.3f}"),
            ("colour_following_share", "items", "colours right (every named colour, every circle there)", None),
            ("circle_right_share", "circle_items", "circle colour right", None),
            ("background_right_share", "background_items", "background right", None),
            ("both_named_circles_share", "two_circle_items", "both named circles right (two-circle prompts)", None))


def p3_judge_table(judge: dict, path: Path) -> tuple[list, list]:
    """(header, rows) of the fill50k_judge block: all items, then by the number of circles in the control."""
    by = need(judge, "by_circles", path, dict)
    groups = [("all", judge)] + [(f"{n} circle{'s' if n != '1' else ''}", g) for n, g in by.items()]
    rows = []
    for key, count_key, label, fmt in P3_JUDGE:
        row = [label]
        for i, (_, g) in enumerate(groups):
            value, count = need_share(g, key, path), need(g, count_key, path, int)
            text = "—" if value is None else fmt.format(value) if fmt else pct(value)
            row += [text, count] if i == 0 else [f"{text} ({count})"]
        rows.append(row)
    return ["", "all", "items", *[f"{name} (items)" for name, _ in groups[1:]]], rows


def p3_section(root: Path) -> Section:
    s = Section(figures=figures(root, "p3_figs", {"two_circles.png": "two-circle control and its two prompts"}))
    path = root / "p3_scores.json"
    r = load(path)
    if r is not None:
        images = need(r, "images", path, int)
        heads = []
        judge = r.get("fill50k_judge") if isinstance(r, dict) else None
        if judge is not None:
            if not isinstance(judge, dict):
                raise UserError(f"{path}: 'fill50k_judge' should be an object, got {judge!r}")
            header, rows = p3_judge_table(judge, path)
            s.tables.append((f"Offline Fill50k judge on hw2_3.sh's {images} images of the test split "
                             f"(p3_controlnet/fill50k_judge.py; circles counted in the "
                             f"{judge.get('circles_from', '?')})", header, rows, path))
            iou, follow = need_share(judge, "iou_mean", path), need_share(judge, "colour_following_share", path)
            parts = ([f"mask IoU {iou:.2f}"] if iou is not None else []) + (
                [f"colours right {pct(follow)}"] if follow is not None else [])
            if parts:
                heads.append(", ".join(parts) + " (offline Fill50k judge)")
            unparsed = need(judge, "unparsed_items", path, int)
            if unparsed:
                s.notes.append(f"{unparsed} prompt(s) the judge cannot read were left out (listed in {path.name}).")
        rows = [[label, fmt.format(need(r, key, path, NUMBER))] for key, (label, fmt) in P3_METRICS.items()
                if key in r]
        if rows or judge is None:  # the judge alone says all a mini-SD run has: no empty table beside it
            s.tables.append(("Scores of hw2_3.sh's images on the test split (scripts/evaluate_controlnet.py)",
                             ["metric", "value"], [["images", images], *rows], path))
        skipped = r.get("skipped")
        if skipped:  # a list of "metric: needs ..." lines (a string in older files)
            names = [str(x).split(":", 1)[0] for x in skipped] if isinstance(skipped, list) else [str(skipped)]
            s.notes.append(f"Not scored: {', '.join(names)} (what each needs is under \"skipped\" in {path.name}).")
        # beside the judge's mask IoU, the colour IoU would read as a second IoU: the table has it
        for k in ("clip_score",) if judge is not None else ("colour_iou", "clip_score"):
            if k in r:
                heads.append(f"{P3_METRICS[k][0].split(' (')[0]} {P3_METRICS[k][1].format(r[k])}")
        s.headline = ", ".join(heads)
    s.galleries.append(("hw2_3.sh outputs (first 6 of the test split)", first_images(root / "p3", 6)))
    return s


def p4_section(root: Path) -> Section:
    s = Section(figures=figures(root, "p4_report", {}, "tsne_*.png"))
    rows, heads = [], []
    for target, name in (("usps", "USPS"), ("svhn", "SVHN")):
        path = root / "p4" / f"{target}_accuracy.json"
        r = load(path)
        if r is None:
            continue
        acc = need(r, "accuracy", path, NUMBER)
        rows.append([f"MNIST-M → {name}", need(r, "total", path, int), need(r, "correct", path, int), pct(acc),
                     f"checkpoints/p4_dann_{target}.safetensors", f"labels: {r.get('labels', '?')}"])
        heads.append(f"{name} {pct(acc)}")
    if rows:
        s.tables.append(("hw2_dann.sh on target images with known labels (shipped DANN checkpoints)",
                         ["scenario", "images", "correct", "accuracy", "checkpoint", "scored against"], rows, None))
        s.headline = "DANN " + ", ".join(heads) + " (true labels)"
    path = root / "p4_report" / "results.json"
    r = load(path)
    if r is None and rows:
        s.notes.append("The three-mode comparison (trained on source / DANN / trained on target, all three scenarios) "
                       "and the t-SNE plots come from `python p4_dann/report.py --out ROOT/p4_report`; measured "
                       "numbers are in BENCHMARKS.md, and why MNIST-M → SVHN stays low in p4_dann/README.md.")
    if r is not None:
        results = need(r, "results", path, dict)
        modes = ["source", "dann", "target"]
        cols = list(results)
        table = []
        for mode in modes:
            cells = []
            for key in cols:
                run = results[key].get(mode) if isinstance(results[key], dict) else None
                cells.append(pct(need(run, "test_acc", path, NUMBER)) if run else "n/a")
            if any(c != "n/a" for c in cells):
                table.append([{"source": "trained on source", "dann": "DANN", "target": "trained on target"}[mode],
                              *cells])
        if table:
            s.tables.append((f"Target test accuracy (p4_dann/report.py; device {r.get('device', '?')})",
                             ["", *[" → ".join(TITLES.get(d, d) for d in c.split("_")) for c in cols]], table, path))
            if not s.headline:
                dann = next((t for t in table if t[0] == "DANN"), None)
                if dann:
                    s.headline = "DANN " + ", ".join(f"{TITLES.get(c.split('_')[-1], c)} {v}"
                                                     for c, v in zip(cols, dann[1:])) + " (target test split)"
    return s


P5_METHODS = {"ti": "textual inversion, one concept at a time", "joint": "joint-kv, both concepts at once",
              "init_word": "the same prompts with the init words"}
P5_JUDGED = {"ti": "the learned tokens",
             "init_word": "the init-word baseline, the same prompts with the init words in place of the tokens: "
                          "it should mostly not show the concept"}
# evaluate_ti.py --judge fill50k, per prompt and pooled per entry: (key, column)
P5_JUDGE_COLUMNS = (("concept_share", "concept shown"), ("token_colour_share", "token colour right"),
                    ("striped_share", "striped as asked"), ("background_right_share", "background right"),
                    ("colour_following_share", "every named colour right"))


def p5_clip_table(r: dict, path: Path, method: str) -> tuple[tuple, str]:
    """The course's CLIP grading (SD v1.4 runs): (table, headline part)."""
    rows = []
    for p in need(r, "prompts", path, list):
        base = p.get("baseline")
        rows.append([p.get("concept", "?"), p.get("prompt", "?"), f"{need(p, 'image_score', path, NUMBER):.3f}",
                     f"{need(p, 'text_score', path, NUMBER):.3f}",
                     " / ".join(f"{b:.2f}" for b in base) if base else "",
                     {True: "pass", False: "below", None: ""}[p.get("pass")]])
    table = (f"CLIP scores of the generated images ({P5_METHODS[method]}; {r.get('clip_model', '?')})",
             ["concept", "prompt", "image score", "text score", "baseline (image / text)", ""], rows, path)
    return table, f"{method}: {need(r, 'passed', path, int)}/{need(r, 'graded', path, int)} prompts pass"


def p5_judge_table(r: dict, path: Path, method: str) -> tuple[tuple, dict[str, float]]:
    """The offline Fill50k judge (mini SD runs): (table, each entry's concept share)."""
    def cells(d: dict) -> list:
        return [need(d, "images", path, int), *[pct_or_dash(need_share(d, key, path)) for key, _ in P5_JUDGE_COLUMNS]]

    rows = [[need(p, "concept", path, str), need(p, "prompt", path, str), *cells(p)]
            for p in need(r, "prompts", path, list)]
    shares = {}
    for entry, e in need(r, "concepts", path, dict).items():
        rows.append([entry, "all its prompts", *cells(e)])
        share = need_share(e, "concept_share", path)
        if share is not None:  # entries without a concept (no token in any prompt) are left out
            shares[entry] = share
    meaning = ", ".join(f"{t} = {v}" for t, v in [*need(r, "aliases", path, dict).items(),
                                                  *need(r, "style_tokens", path, dict).items()])
    table = (f"Offline Fill50k judge on {P5_JUDGED.get(method, P5_METHODS[method])} "
             f"(scripts/evaluate_ti.py --judge fill50k{'; ' + meaning if meaning else ''})",
             ["entry", "prompt", "images", *[c for _, c in P5_JUDGE_COLUMNS]], rows, path)
    return table, shares


def p5_section(root: Path) -> Section:
    s = Section(figures=figures(root, "p5_zeroshot", {"cases.png": "zero-shot successes and failures"})
                + figures(root, "p5_figs", {"ti_prompts.png": "each prompt with the learned tokens, then with "
                                                              "their init words"}))
    heads = []
    path = root / "p5_zeroshot" / "summary.json"
    r = load(path)
    if r is not None:
        ens = need(r, "ensemble", path, dict)
        acc = need(ens, "accuracy", path, NUMBER)
        rows = [[t.get("template", "?"), pct(need(t, "accuracy", path, NUMBER))] for t in r.get("single_template", [])]
        rows.append([f"ensemble of {ens.get('templates', '?')} templates", pct(acc)])
        s.tables.append((f"CLIP zero-shot accuracy ({r.get('model', '?')}, {r.get('images', '?')} images, "
                         f"{r.get('classes', '?')} classes)", ["prompt template", "accuracy"], rows, path))
        heads.append(f"zero-shot {pct(acc)}")
    judged, tokens, entry_tokens = {}, [], {}
    for method in P5_METHODS:
        path = root / f"p5_scores_{method}.json"
        r = load(path)
        prompts = {}  # (entry, prompt index) -> prompt, for the gallery titles
        if r is not None:
            # a judge report says so ("judge": "fill50k"); the CLIP report of SD v1.4 runs has no such key
            if isinstance(r, dict) and r.get("judge") == "fill50k":
                table, judged[method] = p5_judge_table(r, path, method)
                tokens = tokens or [*r["aliases"], *r["style_tokens"]]  # both checked by p5_judge_table
                if method == "ti":  # each entry named by the tokens its prompts hold
                    for p in r["prompts"]:
                        held = [t for t in tokens if t in str(p.get("prompt"))]
                        entry_tokens.setdefault(str(p.get("concept")), held)
            else:
                table, head = p5_clip_table(r, path, method)
                heads.append(head)
            s.tables.append(table)
            prompts = {(str(p.get("concept")), str(p.get("prompt_index"))): p.get("prompt") for p in r["prompts"]}
        gen = root / f"p5_gen_{method}"
        if gen.is_dir():
            for prompt_dir in sorted(d for d in gen.glob("*/*") if d.is_dir()):
                prompt = prompts.get((prompt_dir.parent.name, prompt_dir.name))
                s.galleries.append((f"{method.replace('_', ' ')}: {prompt_dir.parent.name} / {prompt_dir.name}"
                                    + (f": {prompt}" if prompt else ""), first_images(prompt_dir, 5)))
    if judged.get("ti"):
        # per entry, so a prompt holding both tokens does not hide how each token does alone
        base = judged.get("init_word") or {}
        parts = [f"{' + '.join(entry_tokens.get(k) or [f'entry {k}'])} {pct(v)}"
                 + (f" vs {pct(base[k])}" if k in base else "") for k, v in judged["ti"].items()]
        heads.append("concept shown with the tokens" + (" vs the init words" if base else "") + ": "
                     + ", ".join(parts) + " (offline judge)")
    s.headline = ", ".join(heads)
    return s


@dataclass
class Problem:
    key: str
    title: str
    build: object
    needs: str


PROBLEMS = [
    Problem("p1", "Problem 1: class-conditional DDPM (MNIST-M + SVHN)", p1_section,
            "nothing beyond this repository: the shipped checkpoints/p1_ddpm.safetensors (make demo)"),
    Problem("iclevr", "Problem 1, lab variant: i-CLEVR multi-label DDPM", iclevr_section,
            "nothing beyond this repository: checkpoints/p1_iclevr.safetensors and assets/iclevr/"),
    Problem("p2", "Problem 2: DDIM with the course's face UNet", p2_section,
            "the course's face folder: FACE_DIR=/path/to/hw2_data/face make demo (noise/*.pt, GT/*.png, UNet.pt)"),
    Problem("p3", "Problem 3: ControlNet on Fill50k (the mini Stable Diffusion; SD v1.4 with SD_PATH)", p3_section,
            "nothing beyond this repository for the mini SD: checkpoints/mini_sd and checkpoints/mini_controlnet "
            "(make demo); for Stable Diffusion v1.4: SD_PATH=/path/to/sd-v1-4.ckpt [CONTROLNET=runs/p3/controlnet] "
            "make demo (without CONTROLNET a short demo ControlNet is trained first, on a GPU)"),
    Problem("p4", "Problem 4: DANN (MNIST-M → USPS, MNIST-M → SVHN)", p4_section,
            "nothing beyond this repository: checkpoints/p4_dann_{usps,svhn}.safetensors and assets/p4/"),
    Problem("p5", "Problem 5: CLIP zero-shot and textual inversion (the mini SD; SD v1.4 with SD_PATH)", p5_section,
            "CLIP_WEIGHTS=/path/to/ViT-B-32.pt and CLIP_DATA=/path/to/hw2_data/clip_zeroshot (zero-shot); "
            "textual inversion: nothing beyond this repository on the mini SD (checkpoints/mini_sd, "
            "checkpoints/mini_ti, assets/mini_ti), or SD_PATH=/path/to/sd-v1-4.ckpt and ../shared/data/dreambooth "
            "on SD v1.4 (CLIP_WEIGHTS scores it)"),
]


def read_steps(root: Path) -> dict[str, list[dict]] | None:
    """Demo step records by problem key (the name's prefix), or None when ROOT has no steps/ (a full-size run)."""
    folder = root / "steps"
    if not folder.is_dir():
        return None
    keys = {p.key for p in PROBLEMS}
    steps: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
        rec = read_json(path, "step record")
        name = need(rec, "name", path, str)
        if "skipped" not in rec:
            need(rec, "command", path, str)
            need(rec, "seconds", path, NUMBER)
        key = name.split("_", 1)[0]
        if key not in keys:
            raise UserError(f"{path}: step {name!r} does not start with a problem ({', '.join(sorted(keys))})")
        steps.setdefault(key, []).append(rec)
    return steps


# ---- HTML -----------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em 2em 4em;color:#1d1f23;line-height:1.45;background:#fff}
h1{margin:0 0 .2em;font-size:1.7em}
h2{margin:2.2em 0 .6em;padding-top:.6em;border-top:2px solid #e3e6ea;font-size:1.35em}
h3{font-size:1.05em;margin:1.4em 0 .4em}
.sub{color:#5b6270;margin:0 0 1.2em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.93em}
th,td{border:1px solid #d5d9df;padding:.3em .65em;text-align:left;vertical-align:top}
th{background:#f2f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.cmds td{border:none;border-bottom:1px solid #e3e6ea;padding:.25em .6em}table.cmds pre{margin:0}
.ok{color:#17692f;font-weight:600}.partial{color:#8a5a00;font-weight:600}.no{color:#a12622;font-weight:600}
figure{margin:1em 0 1.8em}figure img{max-width:100%;height:auto;border:1px solid #e3e6ea;display:block}
img.px{image-rendering:pixelated}
figcaption{margin-top:.35em;font-size:.93em}
code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f6f8fa;border:1px solid #e3e6ea;padding:.45em .7em;overflow-x:auto;white-space:pre-wrap;
margin:.3em 0}pre span,code.nw{white-space:nowrap}
.needs{background:#fff8e6;border-left:4px solid #e0a800;padding:.5em .9em;margin:.6em 0}
.gallery{display:flex;flex-wrap:wrap;gap:6px;margin:.3em 0 1em}
.gallery img{height:96px;width:auto;border:1px solid #e3e6ea}
.note{color:#5b6270;font-size:.88em}
nav a{margin-right:1em}
"""

esc = html.escape


def cmd_html(command: str) -> str:
    """A command in a <pre> that wraps only between words, never inside an option such as --json."""
    return "<pre>" + " ".join(f"<span>{esc(word)}</span>" for word in command.split(" ")) + "</pre>"


def rel(path: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(path, page_dir)).as_posix()


def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def table_html(header: list, rows: list) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for v in row:
            text = str(v)
            num = isinstance(v, NUMBER) or text.rstrip("%").replace(".", "", 1).replace("/", "", 1).isdigit()
            cells.append(f'<td class="num">{esc(text)}</td>' if num else f"<td>{esc(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


SETTING_KEYS = ("checkpoint", "unet", "controlnet", "sd", "sampler", "steps", "eta", "guidance", "seed")


def caption_html(info: dict) -> str:
    parts = []
    for key in SETTING_KEYS:
        if key in info:
            v = info[key]
            label = {"steps": "steps", "seed": "seed", "sd": "SD", "unet": "UNet", "eta": "eta"}.get(key, key)
            parts.append(f"{label} <code>{esc(str(v))}</code>" if key in ("checkpoint", "unet", "controlnet", "sd")
                         else f"{label} {esc(str(v))}")
    line = f"<b>{esc(info['what'])}</b>" + (" — " + ", ".join(parts) if parts else "")
    if info.get("command"):
        line += cmd_html(info["command"])
    return line


def status_of(section: Section, steps: list[dict] | None, demo: bool) -> tuple[str, str, bool]:
    """(css class, text, has content) of a problem."""
    has = bool(section.figures or section.tables or any(g[1] for g in section.galleries))
    if not demo:
        return ("ok", "found", True) if has else ("no", "not found", False)
    ran = [s for s in steps or [] if "skipped" not in s]
    skipped = [s for s in steps or [] if "skipped" in s]
    failed = [s for s in ran if s.get("returncode", 0) != 0]
    if failed:
        return "no", f"failed at step {failed[0]['name']}", has
    if not ran:
        return "no", "not run" + (": " + "; ".join(s["skipped"] for s in skipped) if skipped else ""), False
    if skipped:
        return "partial", "partly run: " + "; ".join(s["skipped"] for s in skipped), has
    return "ok", "ran", has


def build_page(root: Path, title: str, page_dir: Path) -> str:
    steps = read_steps(root)
    demo = steps is not None
    rows, body = [], []
    for prob in PROBLEMS:
        section = prob.build(root)
        psteps = (steps or {}).get(prob.key, [])
        cls, status, has = status_of(section, psteps, demo)
        seconds = sum(s["seconds"] for s in psteps if "seconds" in s)
        rows.append(f'<tr><td><a href="#{prob.key}">{esc(prob.title)}</a></td><td class="{cls}">{esc(status)}</td>'
                    f"<td>{esc(section.headline) if has and section.headline else '—'}</td>"
                    f'<td class="num">{fmt_seconds(seconds) if psteps and seconds else "—"}</td></tr>')
        body.append(f'<h2 id="{prob.key}">{esc(prob.title)}</h2>')
        if not has or cls != "ok":
            body.append(f'<div class="needs"><b>{esc(status[:1].upper() + status[1:])}.</b> '
                        f"Needs: {esc(prob.needs)}.</div>")
        if not has:
            continue
        for title_, header, trows, source in section.tables:
            body.append(f"<h3>{esc(title_)}</h3>")
            body.append(table_html(header, trows))
            if source is not None:
                body.append(f'<p class="note">numbers from <code>{esc(rel(source, page_dir))}</code></p>')
        for note in section.notes:
            parts = note.split("`")  # `...` is a command: in <code>, kept on one line
            body.append('<p class="note">' + "".join(f'<code class="nw">{esc(t)}</code>' if i % 2 else esc(t)
                                                     for i, t in enumerate(parts)) + "</p>")
        for path, info in section.figures:
            small = path.parent.name in ("p1_figs", "iclevr")
            body.append(f'<figure><img src="{esc(rel(path, page_dir))}" alt="{esc(info["what"])}"'
                        f'{" class=px" if small else ""} loading="lazy">'
                        f"<figcaption>{caption_html(info)}</figcaption></figure>")
        for gtitle, paths in section.galleries:
            if paths:
                imgs = "".join(f'<img src="{esc(rel(p, page_dir))}" alt="{esc(p.name)}" loading="lazy">' for p in paths)
                body.append(f'<h3>{esc(gtitle)}</h3><div class="gallery">{imgs}</div>')
        ran = [s for s in psteps if "skipped" not in s]
        if ran:
            body.append('<h3>Commands, in the order they ran</h3><table class="cmds">')
            for s in ran:
                body.append(f'<tr><td>{esc(s["name"])}</td><td class="num">{fmt_seconds(s["seconds"])}</td>'
                            f"<td>{cmd_html(s['command'])}</td></tr>")
            body.append("</table>")
    summary = ("<table><tr><th>problem</th><th>status</th><th>headline number (grader)</th>"
               "<th>time</th></tr>\n" + "\n".join(rows) + "</table>")
    what = "a <code>make demo</code> run" if demo else "report outputs"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{esc(title)}</h1><p class=\"sub\">Figures and numbers of {what} in "
            f"<code>{esc(str(root))}</code>, built by <code>python scripts/demo_page.py</code> from the files there."
            f"</p>\n{summary}\n" + "\n".join(body) + "\n</body></html>\n")


@cli_main
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("root", help="the demo's output folder (demo_out) or a folder of report outputs (layout above)")
    p.add_argument("--title", default=None, help="page title (default: 'DLCV HW2 demo: ROOT')")
    p.add_argument("--out", default=None, help="page to write (default: ROOT/index.html)")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    out = Path(args.out) if args.out else root / "index.html"
    page = build_page(root, args.title or f"DLCV HW2 demo: {root.name or root}", out.absolute().parent)
    write_text_atomic(out, page)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
