#!/usr/bin/env python
"""Grade textual-inversion images as the course does, with CLIP from a local weights file.

    python scripts/evaluate_ti.py --json hw2_data/textual_inversion/input.json \\
        --input-dir hw2_data/textual_inversion --output-dir OUT --clip-weights ViT-B-32.pt

For every concept c and prompt p of input.json, the generated images are OUT/<c>/<p>/*.png and the
concept's photos are INPUT_DIR/<src_image>/ (or INPUT_DIR/<c>/, as the course's data lays them out):
  image score of a generated image = 100 x mean cosine similarity (CLIP image embeddings) to the photos
  text score of a generated image  = 100 x cosine similarity to prompt_4_clip_eval[p]
The --top-k (5) images with the highest image + 2.5 x text are kept and each score is averaged over them;
the prompt passes when both averages reach its baseline [image, text] (entries without "baseline" are
scored, not graded). An entry whose src_image is a list (a prompt with several learned concepts) gets
the mean of its per-concept image scores, and each concept's score is reported too.
This is what the course's evaluation/grade_hw2_3.py computes. Its image score multiplies the tensor of cosine
similarities by 100, and its text score is CLIP's logits_per_image (logit scale 100 x cosine). Its CLIP is
openai/clip-vit-base-patch32 (transformers), i.e. OpenAI's ViT-B-32.pt here (--clip-model ViT-B-32). It
reads the photos from INPUT_DIR/<key>/ only. It raises an error when a prompt folder does not hold the 25 images
the homework asks for. Preprocessing and arithmetic come from other libraries, so scores may differ from the
course's in the last digits.
Prints a table; --report writes the same as JSON. Exit status 0 whatever the scores (1 with --strict
when a prompt fails).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.clip_loading import add_quick_gelu_flag
from common.datasets import list_images
from common.device import add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.fileio import folder_error, write_text_atomic
from p5_personalization.concepts import find_concept_photos, read_input_json

REPO = Path(__file__).resolve().parents[1]

TEXT_WEIGHT = 2.5
TOP_K = 5


def prompt_scores(generated: torch.Tensor, photos, text: torch.Tensor, top_k: int = TOP_K,
                  text_weight: float = TEXT_WEIGHT) -> dict:
    """Scores of one prompt's images from unit-norm CLIP embeddings.

    generated (N, D); photos (M, D), or a list of them (one per concept of a multi-concept prompt: the image
    score is then the mean of the per-concept scores); text (D,). Returns per-image image/text scores (x100),
    the indices of the top_k images by image + text_weight * text (best first), the two averages over them,
    and the per-concept image scores averaged over them.
    """
    photo_sets = list(photos) if isinstance(photos, (list, tuple)) else [photos]
    if generated.ndim != 2 or text.ndim != 1 or any(p.ndim != 2 for p in photo_sets):
        raise ValueError("expected generated (N,D), photos (M,D) (or a list of them) and text (D,)")
    if len(generated) == 0 or not photo_sets or any(len(p) == 0 for p in photo_sets):
        raise ValueError("need at least one generated image and one photo per concept")
    g, t = generated.double(), text.double()
    per_concept = torch.stack([100.0 * (g @ p.double().T).mean(dim=1) for p in photo_sets])  # (C, N)
    image = per_concept.mean(0)                                # (N,)
    text_s = 100.0 * (g @ t)                                   # (N,)
    combined = image + text_weight * text_s
    k = min(top_k, len(g))
    # stable order: the best combined score first, ties by image index
    order = sorted(range(len(g)), key=lambda i: (-float(combined[i]), i))[:k]
    sel = torch.tensor(order)
    return {
        "image_scores": [float(x) for x in image], "text_scores": [float(x) for x in text_s],
        "selected": order, "image": float(image[sel].mean()), "text": float(text_s[sel].mean()),
        "image_per_concept": [float(x) for x in per_concept[:, sel].mean(1)],
    }


def passes(image: float, text: float, baseline: tuple[float, float]) -> bool:
    return image >= baseline[0] and text >= baseline[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="the course's input.json (prompt_4_clip_eval and baseline per prompt)")
    p.add_argument("--input-dir", required=True, help="folder holding each concept's photos (<src_image>/ or <key>/)")
    p.add_argument(
        "--output-dir", required=True, help="generated images: <key>/<prompt index>/*.png (what hw2_ti.sh writes)"
    )
    p.add_argument("--clip-weights", required=True, help="local CLIP weights (OpenAI .pt or open_clip file); the "
                   "course grades with openai/clip-vit-base-patch32, OpenAI's ViT-B-32.pt")
    p.add_argument(
        "--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-weights (or a JSON config)"
    )
    add_quick_gelu_flag(p)
    p.add_argument("--top-k", type=int, default=TOP_K, help="images kept per prompt (by image + 2.5 x text)")
    p.add_argument("--report", default=None, help="write the scores as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 when any prompt misses its baseline")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    add_precision_flag(p, default="fp32", what="the CLIP image encoder (fp32 by default: the grade should not "
                                               "depend on the GPU)")
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    cases = read_input_json(args.json, need_eval=True)
    out_root = Path(args.output_dir)
    if not out_root.is_dir():
        raise folder_error(out_root, "generated-image folder not found")
    jobs = []
    for case in cases:
        photo_dirs = find_concept_photos(args.input_dir, case)
        photos = []
        for d in photo_dirs:
            files = list_images(d, not_found=None, empty=None)
            if not files:
                raise UserError(f"{d}: no images (photos of entry {case.key!r})")
            photos.append((d, files))
        for p in range(len(case.eval_prompts)):
            gen_dir = out_root / case.key / str(p)
            gen = list_images(gen_dir, not_found=None, empty=None)
            if not gen:
                raise UserError(f"{gen_dir}: no generated images for concept {case.key!r}, prompt {p}")
            jobs.append((case, p, photos, gen))

    from common.clip_loading import encode_image_files, encode_texts, load_clip
    device = pick_device(args.device)
    amp = autocast_dtype(device, args.precision)
    bundle = load_clip(args.clip_model, args.clip_weights, device, args.quick_gelu, model_flag="--clip-model",
                       weights_flag="--clip-weights")
    photo_cache: dict[Path, torch.Tensor] = {}
    results = []
    for case, p, photos, gen in jobs:
        for d, files in photos:
            if d not in photo_cache:
                photo_cache[d] = encode_image_files(bundle, files, args.batch_size, amp)
        g = encode_image_files(bundle, gen, args.batch_size, amp)
        t = encode_texts(bundle, [case.eval_prompts[p]])[0]
        s = prompt_scores(g, [photo_cache[d] for d, _ in photos], t, args.top_k)
        base = case.baseline[p] if case.baseline else None
        results.append({
            "concept": case.key, "prompt_index": p, "prompt": case.prompts[p], "eval_prompt": case.eval_prompts[p],
            "images": len(gen), "kept": [gen[i].name for i in s["selected"]],
            "image_score": s["image"], "text_score": s["text"],
            "image_score_per_concept": dict(zip(case.src_image, s["image_per_concept"])),
            "baseline": list(base) if base else None,
            "pass": passes(s["image"], s["text"], base) if base else None,
        })
    graded = [r for r in results if r["pass"] is not None]
    n_pass = sum(r["pass"] for r in graded)
    print(
        f"CLIP {bundle.name} ({Path(args.clip_weights).name}); top {args.top_k} images by image + {TEXT_WEIGHT} x text"
    )
    print(f"{'concept':>7} {'prompt':>6} {'image':>7} {'text':>7} {'baseline':>13}  result  eval prompt")
    for r in results:
        b = r["baseline"]
        base = f"{b[0]:6.2f}/{b[1]:<6.2f}" if b else f"{'-':>13}"
        verdict = "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        print(f"{r['concept']:>7} {r['prompt_index']:>6} {r['image_score']:7.2f} {r['text_score']:7.2f} "
              f"{base}  {verdict:<6}  {r['eval_prompt']}")
        if len(r["image_score_per_concept"]) > 1:
            print(" " * 16 + "image score per concept: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in r["image_score_per_concept"].items()))
    mean_img = sum(r["image_score"] for r in results) / len(results)
    mean_txt = sum(r["text_score"] for r in results) / len(results)
    print(f"mean over prompts: image {mean_img:.2f}, text {mean_txt:.2f}; "
          f"{n_pass}/{len(graded)} prompts with a baseline reach it")
    report = {"clip_model": bundle.name, "clip_weights": str(args.clip_weights), "top_k": args.top_k,
              "text_weight": TEXT_WEIGHT, "passed": n_pass, "graded": len(graded), "total": len(results),
              "mean_image_score": mean_img, "mean_text_score": mean_txt, "prompts": results}
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
    if args.strict and n_pass < len(graded):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
