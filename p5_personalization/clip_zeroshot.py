#!/usr/bin/env python
"""Zero-shot image classification with CLIP (open_clip) from a local weights file.

    python p5_personalization/clip_zeroshot.py --data hw2_data/clip_zeroshot/val \\
        --labels hw2_data/clip_zeroshot/id2label.json --clip-arch ViT-B-32 --clip-weights ViT-B-32.pt \\
        [--out runs/p5_zeroshot]

--data holds `<classid>_<n>.png` files; --labels maps class ids ("0", "1", ...) to class names. Every
class name is put into each prompt template; a class's text embedding is the normalised mean of its
templates' normalised embeddings (prompt ensembling, Radford et al. 2021). The image is assigned to the
class of highest cosine similarity; confidence is the softmax of CLIP's scaled logits.

Accuracy is measured for each template alone and for the ensemble, in one pass over the images.
Writes to --out (default runs/p5_zeroshot, relative to the current folder):
  predictions.csv   file, true id/label, predicted id/label, confidence, correct (the ensemble's predictions)
  summary.json      accuracy of every single template and of the ensemble, model, weights, counts
  cases.png         5 successes and 5 failures (most confident of each) with true label, prediction, confidence
Nothing is downloaded: --clip-weights is an OpenAI .pt (TorchScript) or open_clip .safetensors/.bin/.pt file
(--weights and --model: the names of --clip-weights and --clip-arch here before, still accepted).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.clip_loading import add_clip_flags, encode_images, encode_texts, load_clip, load_rgb
from common.config import HelpFormatter, int_at_least
from common.datasets import list_images
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.fileio import atomic_path, check_writable, ensure_dir, read_json, write_text_atomic

# "A photo of a {}." is the course's single template; the others are a short ensemble in the spirit of
# CLIP's ImageNet prompt set (photos of objects and animals at different qualities and sizes)
DEFAULT_TEMPLATES = (
    "A photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a good photo of a {}.",
    "a cropped photo of a {}.",
)
DEFAULT_OUT = "runs/p5_zeroshot"
FILE_RE = re.compile(r"^(\d+)_(\d+)\.[^.]+$")  # <classid>_<n>.<an image suffix of list_images>


def read_labels(path: str) -> dict[int, str]:
    p = Path(path)
    raw = read_json(p, "label file (id2label.json)")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{p}: expected a JSON object mapping class ids to names")
    labels = {}
    for k, v in raw.items():
        if not str(k).strip().isdigit() or not isinstance(v, str) or not v.strip():
            raise UserError(f"{p}: entry {k!r}: {v!r} is not '<integer id>': '<class name>'")
        labels[int(k)] = v.strip()
    return labels


def labelled_images(data: str, labels: dict[int, str]) -> list[tuple[Path, int]]:
    """(file, class id) of the <classid>_<n> images in a folder, in numeric order."""
    d = Path(data)
    items = []
    for f in list_images(d, not_found="image folder not found", empty=None):
        m = FILE_RE.match(f.name)
        if not m:
            continue
        cid = int(m.group(1))
        if cid not in labels:
            raise UserError(f"{f}: class id {cid} is not in the label file")
        items.append((f, cid))
    if not items:
        raise UserError(f"{d}: no <classid>_<n>.png images found")
    # numeric order (2_10 after 2_9), so the csv reads naturally
    items.sort(key=lambda it: (it[1], int(FILE_RE.match(it[0].name).group(2))))
    return items


def parse_templates(values: list[str] | None) -> list[str]:
    if not values:
        return list(DEFAULT_TEMPLATES)
    out = []
    for v in values:
        p = Path(v)
        # utf-8-sig: a byte-order mark would otherwise stay at the head of the first template
        lines = p.read_text(encoding="utf-8-sig").splitlines() if "{}" not in v and p.is_file() else [v]
        out.extend(s.strip() for s in lines if s.strip())
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise UserError(f"--templates: every template needs exactly one '{{}}' for the class name, got {bad[0]!r}")
    return out


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, items, preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.preprocess(load_rgb(self.items[i][0]))


def class_text_embeddings(bundle, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """(T, C, D): unit-norm embedding of every template filled with every class name."""
    texts = [t.format(c) for t in templates for c in class_names]
    return encode_texts(bundle, texts).reshape(len(templates), len(class_names), -1)


def ensemble(per_template: torch.Tensor) -> torch.Tensor:
    """(T, C, D) unit vectors -> (C, D): the normalised mean over templates."""
    return torch.nn.functional.normalize(per_template.mean(0), dim=-1)


def write_figure(path: Path, rows: list[dict], k: int = 5) -> tuple[int, int]:
    """A 2 x k figure: the k most confident successes (top) and failures (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    good = sorted((r for r in rows if r["correct"]), key=lambda r: -r["confidence"])[:k]
    bad = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["confidence"])[:k]
    fig, axes = plt.subplots(2, k, figsize=(2.6 * k, 6.2))
    for row_axes, cases, title in ((axes[0], good, "successes"), (axes[1], bad, "failures")):
        for j, ax in enumerate(row_axes):
            ax.axis("off")
            if j >= len(cases):
                ax.text(0.5, 0.5, f"(no more {title})", ha="center", va="center", fontsize=9)
                continue
            r = cases[j]
            ax.imshow(load_rgb(r["path"]))
            ax.set_title(f"{r['file']}\ntrue: {r['true_label']}\npred: {r['pred_label']} ({r['confidence']:.2f})",
                         fontsize=8, color="green" if r["correct"] else "red")
    fig.suptitle("CLIP zero-shot: most confident successes (top) and failures (bottom)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return len(good), len(bad)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="folder of <classid>_<n>.png images")
    p.add_argument("--labels", required=True, help="id2label.json: {\"0\": \"class name\", ...}")
    add_clip_flags(p, required=True, aliases=("--weights", "--model"))  # their names here before
    p.add_argument("--templates", nargs="+", default=None,
                   help="prompt templates with one '{}' for the class name, or text files of one template a line "
                        f"(default: {len(DEFAULT_TEMPLATES)} built-in templates, the first being 'A photo of a {{}}.')")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder for predictions.csv, summary.json and cases.png (default: {DEFAULT_OUT})")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="images per CLIP forward")
    p.add_argument("--num-workers", type=int_at_least(0), default=0, help="image decoding workers")
    add_device_flag(p)
    add_precision_flag(p, what="the image encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = check_writable(args.out)
    labels = read_labels(args.labels)
    items = labelled_images(args.data, labels)
    templates = parse_templates(args.templates)
    device = pick_device(args.device)
    amp = autocast_dtype(device, args.precision)
    bundle = load_clip(args.clip_arch, args.clip_weights, device, args.quick_gelu)

    class_ids = sorted(labels)
    names = [labels[c] for c in class_ids]
    per_template = class_text_embeddings(bundle, names, templates)           # (T, C, D)
    heads = torch.cat([per_template, ensemble(per_template)[None]])          # (T+1, C, D); last = ensemble
    logit_scale = float(bundle.model.logit_scale.exp())

    loader = torch.utils.data.DataLoader(ImageFiles(items, bundle.preprocess), batch_size=args.batch_size,
                                         num_workers=args.num_workers, shuffle=False)
    preds, confs = [], []
    for images in tqdm(loader, desc="classify", disable=args.quiet):
        feats = encode_images(bundle, images, amp)                           # (B, D)
        logits = logit_scale * torch.einsum("bd,hcd->hbc", feats, heads.to(feats.device))
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)                                            # (T+1, B)
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    preds = torch.cat(preds, 1)
    confs = torch.cat(confs, 1)
    truth = torch.tensor([class_ids.index(cid) for _, cid in items])
    acc = (preds == truth).float().mean(1)                                   # (T+1,)

    rows = []
    for i, (path, cid) in enumerate(items):
        k = int(preds[-1, i])
        rows.append(dict(file=path.name, path=path, true_id=cid, true_label=labels[cid], pred_id=class_ids[k],
                         pred_label=names[k], confidence=float(confs[-1, i]), correct=k == int(truth[i])))
    ensure_dir(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "true_id", "true_label", "pred_id", "pred_label", "confidence", "correct"])
    for r in rows:
        w.writerow([r["file"], r["true_id"], r["true_label"], r["pred_id"], r["pred_label"],
                    f"{r['confidence']:.6f}", int(r["correct"])])
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    n_good, n_bad = write_figure(out / "cases.png", rows)
    summary = {
        "model": bundle.name, "weights": bundle.weights, "quick_gelu": bundle.quick_gelu,
        "images": len(items), "classes": len(class_ids),
        "single_template": [{"template": t, "accuracy": float(a)} for t, a in zip(templates, acc[:-1])],
        "ensemble": {"templates": len(templates), "accuracy": float(acc[-1])},
        "figure": {"successes": n_good, "failures": n_bad},
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    width = max(len(t) for t in templates)
    print(f"{len(items)} images, {len(class_ids)} classes, {bundle.name} ({Path(args.clip_weights).name})")
    for t, a in zip(templates, acc[:-1]):
        print(f"  {t:<{width}}  accuracy {100 * float(a):6.2f}%")
    print(f"  {'ensemble of ' + str(len(templates)):<{width}}  accuracy {100 * float(acc[-1]):6.2f}%")
    print(f"wrote {out / 'predictions.csv'}, {out / 'summary.json'}, {out / 'cases.png'}")
    return summary


if __name__ == "__main__":
    main()
