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
openai/clip-vit-base-patch32 (transformers), i.e. OpenAI's ViT-B-32.pt here (--clip-arch ViT-B-32). It
reads the photos from INPUT_DIR/<key>/ only. It raises an error when a prompt folder does not hold the 25 images
the homework asks for. Preprocessing and arithmetic come from other libraries, so scores may differ from the
course's in the last digits.
Prints a table; --report writes the same as JSON. Exit status 0 whatever the scores (1 with --strict
when a prompt fails).

--judge fill50k: the mini SD's concepts (issue 16, item 4), judged offline by the Fill50k judge
(p3_controlnet/fill50k_judge.py) instead of CLIP; no weights, no photos (--input-dir, --clip-weights and
prompt_4_clip_eval are not needed):

    python scripts/evaluate_ti.py --judge fill50k --json assets/mini_ti/input.json --output-dir OUT \\
        --alias "<new1>=chartreuse" --style-token "<new2>=stripes" --report scores.json

Every image OUT/<c>/<p>/* (all of them; --top-k does not apply) is judged against prompt[p] of entry c:
  --alias TOKEN=COLOUR        a colour token: the token is a colour word ("a <new1> circle with navy
                              background" asks for a chartreuse circle on navy)
  --style-token TOKEN=stripes a style token: the token is taken out of the prompt before it is read, and
                              every circle of the phrase it stands in must be striped ("<new2> red circle",
                              "a red circle in <new2> style": a striped red circle; "two <new2> circles":
                              both). The judge's stripes check is in its module docstring.
A <token> in a prompt that neither flag maps is an error, as is a prompt the judge cannot read. Per prompt
the report gives colour_following_share (every named colour right, the token's colour included, and every
circle there), token_colour_share (the circles named by colour tokens right), striped_share (the circles a
style token asks for all striped), background_right_share, and concept_share: the share of images where
the concept shows (its colour right, or its circles striped) AND every other named colour is right. Also
pooled over each entry ("concepts") and the images' own verdicts.

The init-word baseline (the same prompts with the init word in place of the token, e.g. "a green circle
with navy background" for <new1>; make_mini_ti_data.py writes them as input_init_word.json) is judged
against the concept's expectation with --expect-concept TOKEN=WORD: in the prompts of --json, the word WORD
(whole words, any case) stands for TOKEN, which --alias or --style-token maps as above. So

    python scripts/evaluate_ti.py --judge fill50k --json assets/mini_ti/input_init_word.json \\
        --output-dir OUT_BASELINE --alias "<new1>=chartreuse" --style-token "<new2>=stripes" \\
        --expect-concept "<new1>=green" --expect-concept "<new2>=white" --report baseline.json

scores "a green circle with navy background" as "a <new1> circle with navy background": a chartreuse
circle on navy, which green is not. (Judging the baseline images with the token input.json itself, which
holds the same prompts in the same places, gives the same numbers; --expect-concept lets the report show
the prompts the images were made from.) A WORD that no prompt holds is an error (a misspelt init word would
otherwise leave the baseline judged as a plain prompt).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.clip_loading import add_clip_flags
from common.config import HelpFormatter, int_at_least
from common.datasets import list_images, load_image
from common.device import add_device_flag, add_precision_flag, autocast_dtype, pick_device
from common.errors import UserError, cli_main
from common.fileio import check_writable_file, folder_error, write_text_atomic
from p3_controlnet.fill50k_judge import Expectation, colour_table, parse_prompt, score_image
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


# ------------------------------------------------------------------------------- --judge fill50k

JUDGES = ("clip", "fill50k")
STYLES = ("stripes",)


@dataclass(frozen=True)
class JudgeConcepts:
    """What the tokens mean to the Fill50k judge (tokens lower-cased, as the judge reads prompts)."""

    aliases: dict[str, str]  # colour token -> colour name
    styles: dict[str, str]  # style token -> style
    stand_ins: dict[str, str]  # token -> the word standing for it in the prompts (--expect-concept)


def parse_pairs(values: list[str], flag: str, example: str) -> dict[str, str]:
    """['<new1>=chartreuse', ...] -> {'<new1>': 'chartreuse'}; UserError naming the flag for a bad one."""
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        key, value = key.strip().lower(), " ".join(value.lower().split())
        if not sep or not key or not value or any(c.isspace() for c in key):
            raise UserError(f"{flag} {v!r}: expected {example}")
        if key in out and out[key] != value:
            raise UserError(f"{flag} {v!r}: {key} is already given as {out[key]!r}")
        out[key] = value
    return out


def judge_concepts(args) -> JudgeConcepts:
    """The --alias, --style-token and --expect-concept flags, checked."""
    from p3_controlnet.fill50k_judge import colour_table
    aliases = parse_pairs(args.alias, "--alias", "TOKEN=COLOUR, e.g. --alias '<new1>=chartreuse'")
    for token, colour in aliases.items():
        colour = colour.replace("grey", "gray")
        if colour not in colour_table():
            raise UserError(f"--alias {token}={colour}: {colour!r} is not a colour the judge knows (CSS colour "
                            "names, written as prompts say them: 'light golden rod yellow')")
        aliases[token] = colour
    styles = parse_pairs(args.style_token, "--style-token", "TOKEN=stripes, e.g. --style-token '<new2>=stripes'")
    for token, style in styles.items():
        if style not in STYLES:
            raise UserError(f"--style-token {token}={style}: the judge knows the style(s) {', '.join(STYLES)}")
        if token in aliases:
            raise UserError(f"--style-token {token}={style}: {token} is also a colour (--alias)")
    stand_ins = parse_pairs(args.expect_concept, "--expect-concept",
                            "TOKEN=WORD, e.g. --expect-concept '<new1>=green'")
    for token, word in stand_ins.items():
        if token not in aliases and token not in styles:
            raise UserError(f"--expect-concept {token}={word}: {token} is given by neither --alias nor --style-token")
    return JudgeConcepts(aliases, styles, stand_ins)


@dataclass(frozen=True)
class JudgedPrompt:
    """A prompt as the judge reads it: what it asks for, and which circles carry a token."""

    text: str  # the prompt judged (stand-in words replaced by their tokens)
    expect: Expectation  # colour tokens stay tokens (score_image resolves them by alias)
    striped: tuple[bool, ...]  # per circle: a style token asks for stripes
    token_colour: tuple[bool, ...]  # per circle: its colour is a colour token

    @property
    def has_concept(self) -> bool:
        return any(self.striped) or any(self.token_colour)

    def as_dict(self) -> dict:
        return {"text": self.text, "circles": list(self.expect.circles), "background": self.expect.background,
                "striped": list(self.striped), "token_colour": list(self.token_colour)}


def _word(word: str) -> str:
    """A regex for `word` as a whole word (not part of another word or token)."""
    return rf"(?<![\w<>-]){re.escape(word)}(?![\w<>-])"


def read_judged_prompt(prompt: str, concepts: JudgeConcepts) -> JudgedPrompt:
    """What `prompt` asks of a Fill50k image with its tokens mapped (see the module docstring); ValueError
    saying why for a prompt the judge cannot read."""
    text = " ".join(prompt.lower().split())
    for token, word in concepts.stand_ins.items():
        text = re.sub(_word(word), token, text)
    judged = text
    all_striped = False
    for token in concepts.styles:
        t = re.escape(token)
        # "circle in <new2> style" and "<new2> style circle" are "<new2> circle"
        text = re.sub(rf"(circles?) in (?:the |an? )?{t}(?: style)?", rf"{token} \1", text)
        text = re.sub(rf"{t} style", token, text)
        two = re.sub(rf"^((?:an? |the )?(?:two|2) )(?:{t} )+(circles )", r"\1\2", text)
        all_striped |= two != text
        text = two
    expect = parse_prompt(text)
    circles, striped = [], []
    for c in expect.circles:
        words = c.split() if c else []
        striped.append(all_striped or any(w in concepts.styles for w in words))
        circles.append(" ".join(w for w in words if w not in concepts.styles) or None)
    background = expect.background
    if any(w in concepts.styles for w in background.split()):
        raise ValueError(f"a style token names the background: {prompt!r}")
    for name in (*circles, background):
        for token in re.findall(r"<[^<>\s]+>", name or ""):
            if token not in concepts.aliases:
                raise ValueError(f"token {token} has no --alias {token}=COLOUR or --style-token {token}=stripes")
        if name is not None and concepts.aliases.get(name, name) not in colour_table():
            raise ValueError(f"{name!r} is not a colour the judge knows")
    return JudgedPrompt(judged, Expectation(tuple(circles), background), tuple(striped),
                        tuple(c in concepts.aliases for c in circles))


def judge_image(image, judged: JudgedPrompt, concepts: JudgeConcepts) -> dict:
    """One image's verdicts: the judge's score and whether the concept shows."""
    s = score_image(image, expect=judged.expect, aliases=concepts.aliases)
    striped = None
    if any(judged.striped):
        striped = s.circles_present and all(s.striped[i] is True for i, want in enumerate(judged.striped) if want)
    token_colour = None
    if any(judged.token_colour):
        token_colour = s.circles_present and all(s.circle_right[i] is True
                                                 for i, tok in enumerate(judged.token_colour) if tok)
    concept = (s.colour_following and striped is not False) if judged.has_concept else None
    return {"colour_following": s.colour_following, "background_right": s.background_right,
            "token_colour": token_colour, "striped_as_asked": striped, "concept": concept,
            "circles_found": s.circles_found, "circle_right": s.circle_right, "striped": s.striped,
            "circle_lab": s.circle_lab, "background_lab": s.background_lab, "notes": s.notes}


def _mean(flags: list) -> float | None:
    flags = [f for f in flags if f is not None]
    return sum(flags) / len(flags) if flags else None


def judge_shares(verdicts: list[dict]) -> dict:
    """Shares over one prompt's (or entry's) images; None where nothing applies."""
    return {"images": len(verdicts),
            "colour_following_share": _mean([v["colour_following"] for v in verdicts]),
            "background_right_share": _mean([v["background_right"] for v in verdicts]),
            "token_colour_share": _mean([v["token_colour"] for v in verdicts]),
            "striped_share": _mean([v["striped_as_asked"] for v in verdicts]),
            "concept_share": _mean([v["concept"] for v in verdicts])}


def _fmt(v: float | None) -> str:
    return f"{'-':>7}" if v is None else f"{v:7.2f}"


def run_fill50k_judge(args, cases) -> dict:
    """--judge fill50k: every prompt's images judged, a table printed, the report returned (and written)."""
    concepts = judge_concepts(args)
    for token, word in concepts.stand_ins.items():
        if not any(re.search(_word(word), " ".join(p.lower().split())) for c in cases for p in c.prompts):
            raise UserError(f"--expect-concept {token}={word}: no prompt of {args.json} holds the word {word!r}")
    out_root = Path(args.output_dir)
    jobs = []
    for case in cases:
        for p, prompt in enumerate(case.prompts):
            try:
                judged = read_judged_prompt(prompt, concepts)
            except ValueError as e:
                raise UserError(f"{args.json}: entry {case.key!r} prompt {p} {prompt!r}: {e}") from None
            gen_dir = out_root / case.key / str(p)
            gen = list_images(gen_dir, not_found=None, empty=None)
            if not gen:
                raise UserError(f"{gen_dir}: no generated images for concept {case.key!r}, prompt {p}")
            jobs.append((case, p, prompt, judged, gen))
    results, per_entry = [], {}
    for case, p, prompt, judged, gen in jobs:
        verdicts = [{"file": f.name, **judge_image(load_image(f), judged, concepts)} for f in gen]
        per_entry.setdefault(case.key, []).extend(verdicts)
        results.append({"concept": case.key, "prompt_index": p, "prompt": prompt, "judged_as": judged.as_dict(),
                        **judge_shares(verdicts), "verdicts": verdicts})
    entries = {k: judge_shares(v) for k, v in per_entry.items()}
    print("Fill50k judge; " + ", ".join([f"{t} = {c}" for t, c in concepts.aliases.items()]
                                         + [f"{t} = {s}" for t, s in concepts.styles.items()]
                                         + [f"'{w}' read as {t}" for t, w in concepts.stand_ins.items()]))
    print(f"{'concept':>7} {'prompt':>6} {'images':>6} {'colours':>7} {'token':>7} {'striped':>7} {'concept':>7}  "
          "prompt")
    for r in results:
        print(f"{r['concept']:>7} {r['prompt_index']:>6} {r['images']:>6} {_fmt(r['colour_following_share'])} "
              f"{_fmt(r['token_colour_share'])} {_fmt(r['striped_share'])} {_fmt(r['concept_share'])}  {r['prompt']}")
    for k, e in entries.items():
        print(f"{k:>7} {'all':>6} {e['images']:>6} {_fmt(e['colour_following_share'])} "
              f"{_fmt(e['token_colour_share'])} {_fmt(e['striped_share'])} {_fmt(e['concept_share'])}")
    report = {"judge": "fill50k", "aliases": concepts.aliases, "style_tokens": concepts.styles,
              "expect_concept": concepts.stand_ins, "total": len(results),
              "mean_concept_share": _mean([r["concept_share"] for r in results]), "concepts": entries,
              "prompts": results}
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--json", required=True, help="the course's input.json (prompt_4_clip_eval and baseline per prompt)")
    p.add_argument("--judge", choices=JUDGES, default="clip",
                   help="clip: the course's CLIP grading; fill50k: the offline Fill50k judge for the mini SD")
    p.add_argument("--input-dir", default=None,
                   help="folder holding each concept's photos (<src_image>/ or <key>/); --judge clip")
    p.add_argument(
        "--output-dir", required=True, help="generated images: <key>/<prompt index>/*.png (what hw2_ti.sh writes)"
    )
    add_clip_flags(p, required=False, aliases=(None, "--clip-model"),  # --clip-model: its name here before
                   weights_help="the course grades with openai/clip-vit-base-patch32, OpenAI's ViT-B-32.pt; "
                                "--judge clip")
    p.add_argument("--alias", action="append", default=[], metavar="TOKEN=COLOUR",
                   help="--judge fill50k: a colour token and its colour (repeatable), e.g. '<new1>=chartreuse'")
    p.add_argument("--style-token", action="append", default=[], metavar="TOKEN=STYLE",
                   help="--judge fill50k: a style token (repeatable): '<new2>=stripes' (its circles must be striped)")
    p.add_argument("--expect-concept", action="append", default=[], metavar="TOKEN=WORD",
                   help="--judge fill50k: in the prompts, WORD stands for TOKEN's concept (repeatable): judge images "
                        "made from init-word prompts against the concept, e.g. '<new1>=green'")
    p.add_argument("--top-k", type=int_at_least(1), default=TOP_K,
                   help="images kept per prompt (by image + 2.5 x text)")
    p.add_argument("--report", default=None, help="write the scores as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 when any prompt misses its baseline")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per CLIP forward")
    add_device_flag(p)
    add_precision_flag(p, default="fp32", what="the CLIP image encoder (fp32 by default: the grade should not "
                                               "depend on the GPU)")
    return p


@cli_main(sigterm=True)
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.judge == "fill50k":
        if args.strict:
            raise UserError("--strict grades against the CLIP baselines: it needs --judge clip")
    else:
        for flag in ("alias", "style_token", "expect_concept"):
            if getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} is for --judge fill50k")
        for flag in ("input_dir", "clip_weights"):
            if getattr(args, flag) is None:
                raise UserError(f"--judge clip needs --{flag.replace('_', '-')}")
    if args.report:
        check_writable_file(args.report)  # fail now, not after the scoring
    cases = read_input_json(args.json, need_eval=args.judge == "clip")
    out_root = Path(args.output_dir)
    if not out_root.is_dir():
        raise folder_error(out_root, "generated-image folder not found")
    if args.judge == "fill50k":
        return run_fill50k_judge(args, cases)
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
    bundle = load_clip(args.clip_arch, args.clip_weights, device, args.quick_gelu)
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
