#!/usr/bin/env python
"""Score ControlNet outputs (P3) against the targets and prompts, from locally given weights only.

    python scripts/evaluate_controlnet.py --pred OUT --prompts hw2_data/fill50k/testing/prompt.json \\
        --source hw2_data/fill50k/testing/source [--gt hw2_data/fill50k/testing/target] [--json scores.json] \\
        [--clip-weights ViT-B-32.pt] [--fid-weights pt_inception-2015-12-05-6726825d.pth] \\
        [--sam2-checkpoint sam2.1_hiera_small.pt --sam2-config ...]

The generated images are OUT/<target> for each line of --prompts (what hw2_3.sh writes); the control of a
line is SOURCE/<source>.

Metrics (each needs only what is named; a missing piece is reported by name and the others still run):
  fill50k_judge  the offline Fill50k judge (p3_controlnet/fill50k_judge.py; no weights), on --prompts and,
               for the mask IoU, the controls in --source: per generated image (at its own size) the circles
               it finds, their colours and the background's against the prompt (CIELAB, within 25 delta E
               and nearest to the named colour), their union's IoU with the control's filled circles, and
               whether each circle is drawn striped. Reported: iou_mean, colour_following_share (every
               named colour right, every circle there), circle_right_share, background_right_share,
               both_named_circles_share (two-circle items naming both colours), striped_share, each with
               its item count; the same split by the number of circles in the control ("by_circles"; by the
               prompt's count without --source). Every caption form make_fill50k.py writes is read; a prompt
               the judge cannot read (or naming an unknown colour) is counted ("unparsed_items", the first
               ones listed) and left out, not an error.
  colour_iou   circle-mask IoU with the target, where a pixel belongs to a circle when its colour is nearer
               one of the prompt's circle colours than its background colour (items whose prompt names every
               colour, read by the judge's parse_prompt; no weights). A cheap stand-in for the course's
               segmentation overlap, not the course metric.
  clip_score   mean CLIP cosine(image, prompt), also x100 clipped at 0 (torchmetrics' CLIPScore scale);
               open_clip architecture --clip-arch with the local --clip-weights file: OpenAI's TorchScript
               ViT-B-32.pt (QuickGELU on) or an open_clip checkpoint (common/clip_loading.py, as P5 loads it).
  fid          Frechet Inception Distance between --pred and --gt; InceptionV3 from torch-fidelity with
               the local --fid-weights file (torch-fidelity's pt_inception-2015-12-05 weights).
  sam2_iou_x_clip  the course's score as we read it: mean over images of IoU(SAM2 mask of the circle in
               the generated image, SAM2 mask in the target) x CLIP cosine; needs the `sam2` package,
               --sam2-checkpoint and --sam2-config. The point prompt is the target circle's centre.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from common.clip_loading import add_clip_flags
from common.config import HelpFormatter
from common.datasets import PNG_SUFFIXES, list_images, load_image
from common.device import add_device_flag, pick_device
from common.errors import UserError, cli_main
from common.fileio import check_writable_file, folder_error, write_text_atomic

FID_PIP = "torch-fidelity==0.4.0"


def colour_masks(image: np.ndarray, circle_rgb, background_rgb) -> np.ndarray:
    """(H,W) bool: pixels nearer the circle colour (or, given a list of colours, one of them) than the
    background colour."""
    x = image.astype(np.float32)
    circles = np.asarray(circle_rgb, np.float32).reshape(-1, 3)
    dc = np.min([((x - c) ** 2).sum(-1) for c in circles], axis=0)
    db = ((x - np.asarray(background_rgb, np.float32)) ** 2).sum(-1)
    return dc < db


def prompt_rgbs(prompt: str | None, colours: dict) -> tuple[list, tuple] | None:
    """(circle RGBs, background RGB) of a Fill50k prompt naming every colour, read by the judge's
    parse_prompt; None for any other prompt."""
    from p3_controlnet.fill50k_judge import parse_prompt
    if not prompt:
        return None
    try:
        e = parse_prompt(prompt)
    except ValueError:
        return None
    if any(c not in colours for c in e.circles) or e.background not in colours:
        return None
    return [colours[c] for c in e.circles], colours[e.background]


def judge_items(items: list[dict], images: list[np.ndarray], source: Path | None, prompts_path) -> dict:
    """The fill50k_judge metric (see the module docstring) of generated images against their prompt.json
    lines, with the controls from `source` (None: no IoU)."""
    from p3_controlnet.fill50k_judge import control_circle_count, parse_prompt, score_image, summarise
    if source is not None:  # every control there before anything is scored
        for it in items:
            if not (source / it["source"]).is_file():
                raise UserError(f"{source / it['source']}: control image listed in {prompts_path} not found "
                                f"(--source)")
    scores, counts, unparsed = [], [], []
    for it, image in zip(items, images):
        try:
            expect = parse_prompt(it["prompt"])
            control = load_image(source / it["source"], size=None) if source is not None else None
            score = score_image(image, expect=expect, control=control)
        except ValueError as e:
            unparsed.append({"target": it["target"], "prompt": it["prompt"], "error": str(e)})
            continue
        scores.append(score)
        counts.append(control_circle_count(control) if control is not None else len(expect.circles))
    out = summarise(scores)
    out.update(unparsed_items=len(unparsed), unparsed=unparsed[:10],
               circles_from="control" if source is not None else "prompt",
               by_circles={str(n): summarise([s for s, c in zip(scores, counts) if c == n])
                           for n in sorted(set(counts))})
    return out


JUDGE_LINES = (("items", "items judged"), ("iou_mean", "mask IoU vs control"),
               ("colour_following_share", "colour following"), ("circle_right_share", "circle colour right"),
               ("background_right_share", "background right"), ("both_named_circles_share", "both circles right"),
               ("striped_share", "striped"))
_JUDGE_COUNTS = {"iou_mean": "iou_items", "circle_right_share": "circle_items",
                 "background_right_share": "background_items", "both_named_circles_share": "two_circle_items"}


def print_judge(judge: dict) -> None:
    """The fill50k_judge block as a table: all items, then by number of circles."""
    groups = [("all", judge)] + [(f"{n} circle{'s' if n != '1' else ''}", v) for n, v in judge["by_circles"].items()]
    print(f"fill50k_judge (circles counted in the {judge['circles_from']}):")
    print(f"{'':>22}" + "".join(f"{name:>14}" for name, _ in groups))
    for key, label in JUDGE_LINES:
        cells = []
        for _, g in groups:
            v = g[key]
            n = g.get(_JUDGE_COUNTS.get(key, "items"))
            cells.append(f"{'-':>14}" if v is None else f"{v:>14}" if key == "items" else f"{v:>8.3f} ({n:>3})")
        print(f"{label:>22}" + "".join(cells))
    if judge["unparsed_items"]:
        first = judge["unparsed"][0]
        print(f"{judge['unparsed_items']} prompt(s) the judge cannot read were left out, e.g. {first['target']}: "
              f"{first['error']}", file=sys.stderr)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two (N, D) feature sets."""
    from scipy import linalg
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the reference FID code does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def load_items(prompts: Path | None, pred: Path) -> list[dict]:
    if prompts is not None:
        from p3_controlnet.data import read_prompt_file
        items = read_prompt_file(prompts)
    else:
        pngs = list_images(pred, PNG_SUFFIXES, not_found=None, empty=None)
        items = [{"target": p.name, "prompt": None} for p in pngs]
    for it in items:
        if not (pred / it["target"]).is_file():
            raise UserError(f"{pred / it['target']}: generated image missing (listed in {prompts})")
    if not items:
        raise UserError(f"{pred}: no PNG images")
    return items


def clip_scores(bundle, images: list[np.ndarray], prompts: list[str], batch_size: int = 32) -> np.ndarray:
    """(N,) CLIP cosine of each image with its prompt; `bundle` from common.clip_loading.load_clip."""
    from PIL import Image

    from common.clip_loading import encode_images, encode_texts
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([bundle.preprocess(Image.fromarray(im)) for im in images[i:i + batch_size]])
        fi = encode_images(bundle, x)
        ft = encode_texts(bundle, prompts[i:i + batch_size])
        out.append((fi * ft).sum(-1).cpu())
    return torch.cat(out).numpy()


def inception_features(images: list[np.ndarray], weights: str, device) -> np.ndarray:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(f"FID needs torch-fidelity's InceptionV3: pip install {FID_PIP}") from None
    if not Path(weights).is_file():
        raise UserError(f"{weights}: --fid-weights file not found")
    net = (
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        .to(device)
        .eval()
    )
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(np.stack(images[i:i + 32])).permute(0, 3, 1, 2).contiguous().to(device)  # uint8
            feats.append(net(x)[0].reshape(len(x), -1).double().cpu())
    return torch.cat(feats).numpy()


def sam2_ious(pred_imgs, gt_imgs, centres, checkpoint: str, config: str, device) -> np.ndarray:
    try:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError:
        raise UserError("the SAM2 score needs the `sam2` package (Meta's segment-anything-2) installed") from None
    if not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: --sam2-checkpoint file not found")
    predictor = SAM2ImagePredictor(build_sam2(config, checkpoint, device=str(device)))
    out = []
    for p, g, (cx, cy) in zip(pred_imgs, gt_imgs, centres):
        masks = []
        for im in (p, g):
            predictor.set_image(im)
            m, scores, _ = predictor.predict(point_coords=np.array([[cx, cy]]), point_labels=np.array([1]),
                                             multimask_output=False)
            masks.append(m[0] > 0)
        out.append(iou(*masks))
    return np.asarray(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pred", required=True, help="folder of generated images (OUT_DIR of hw2_3.sh)")
    p.add_argument("--gt", default=None, help="folder of target images (fill50k/testing/target)")
    p.add_argument("--prompts", default=None, help="prompt.json naming the images and their prompts")
    p.add_argument("--source", default=None,
                   help="folder of the control images (fill50k/testing/source): the fill50k_judge's mask IoU")
    add_clip_flags(p, required=False, weights_help="for the CLIP score (none: no CLIP score)")
    p.add_argument(
        "--fid-weights",
        default=None,
        help="local torch-fidelity InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument("--sam2-checkpoint", default=None, help="local SAM2 checkpoint (e.g. sam2.1_hiera_small.pt)")
    p.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_s.yaml", help="its sam2 config name")
    add_device_flag(p)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


@cli_main(sigterm=True)
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.json:
        check_writable_file(args.json)  # fail now, not after the scoring
    from p3_controlnet.make_fill50k import named_colours
    device = pick_device(args.device)
    pred = Path(args.pred)
    if not pred.is_dir():
        raise folder_error(pred, "--pred folder not found")
    items = load_items(Path(args.prompts) if args.prompts else None, pred)
    pred_imgs = [load_image(pred / it["target"]) for it in items]
    generated = pred_imgs  # the judge's input: each image at its own size
    source = None
    if args.source:
        source = Path(args.source)
        if not source.is_dir():
            raise folder_error(source, "--source folder (control images) not found")
        if not args.prompts:
            raise UserError("--source needs --prompts (the prompt.json naming each image's control)")
    gt_imgs = None
    if args.gt:
        gt = Path(args.gt)
        if not gt.is_dir():
            raise folder_error(gt, "--gt folder not found")
        gt_imgs = [load_image(gt / it["target"], size=None) for it in items]
        from PIL import Image

        pred_imgs = [
            im if im.shape == g.shape else np.asarray(Image.fromarray(im).resize(g.shape[1::-1], Image.BICUBIC))
            for im, g in zip(pred_imgs, gt_imgs)
        ]
    results: dict = {"images": len(items)}
    skipped: list[str] = []
    prompts = [it.get("prompt") for it in items]

    judge = None
    if args.prompts:
        judge = judge_items(items, generated, source, args.prompts)
        results["fill50k_judge"] = judge
        if source is None:
            skipped.append("fill50k_judge mask IoU: needs --source (the folder of the control images)")
    else:
        skipped.append("fill50k_judge: needs --prompts (and --source for the mask IoU)")

    colours = dict(named_colours())
    parsed = [prompt_rgbs(p, colours) for p in prompts]
    clip = None
    centres = None
    if gt_imgs is not None and any(parsed):
        ious, centres = [], []
        for im, g, m in zip(pred_imgs, gt_imgs, parsed):
            if m is None:
                centres = None
                continue
            mg = colour_masks(g, *m)
            ious.append(iou(colour_masks(im, *m), mg))
            ys, xs = np.nonzero(mg)
            if centres is not None:
                centres.append((float(xs.mean()), float(ys.mean())) if len(xs) else (g.shape[1] / 2, g.shape[0] / 2))
        results["colour_iou"] = float(np.mean(ious))
        results["colour_iou_items"] = len(ious)
    else:
        skipped.append(
            "colour_iou: needs --gt and --prompts with Fill50k prompts naming every colour "
            "('<colour> circle with <colour> background')"
        )

    if args.clip_weights and all(prompts):
        from common.clip_loading import load_clip
        bundle = load_clip(args.clip_arch, args.clip_weights, device, args.quick_gelu)
        clip = clip_scores(bundle, pred_imgs, prompts)
        results["clip_cosine"] = float(clip.mean())
        results["clip_score"] = float(100 * np.clip(clip, 0, None).mean())
    else:
        skipped.append("clip_score: needs --prompts and --clip-weights (a local CLIP weights file of --clip-arch)")

    if gt_imgs is not None and args.fid_weights:
        if len(items) < 2:
            skipped.append("fid: needs at least 2 images")
        else:
            results["fid"] = frechet_distance(inception_features(pred_imgs, args.fid_weights, device),
                                              inception_features(gt_imgs, args.fid_weights, device))
    else:
        skipped.append(
            f"fid: needs --gt and --fid-weights (torch-fidelity's InceptionV3 weights; pip install {FID_PIP})"
        )

    if args.sam2_checkpoint and clip is not None and centres is not None:
        s = sam2_ious(pred_imgs, gt_imgs, centres, args.sam2_checkpoint, args.sam2_config, device)
        results["sam2_iou"] = float(s.mean())
        results["sam2_iou_x_clip"] = float((s * clip).mean())
    else:
        skipped.append(
            "sam2_iou_x_clip: needs the `sam2` package, --sam2-checkpoint, --clip-weights, --gt and Fill50k --prompts"
        )

    for k, v in results.items():
        if not isinstance(v, dict):
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if judge is not None:
        print_judge(judge)
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    results["skipped"] = skipped
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
