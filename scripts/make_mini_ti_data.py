#!/usr/bin/env python
"""The textual-inversion data of the mini SD (issue 16, item 4): two concepts the mini SD can draw but has no
word for, five training images each with per-image captions, and course-format prompt files.

    python scripts/make_mini_ti_data.py --out assets/mini_ti

The mini SD's data (p3_controlnet/make_fill50k.py --preset mini) holds both concepts without naming them:
  <new1>  chartreuse circles: chartreuse is drawn (one circle in eleven) but never said; its captions name no
          circle colour ("circle with navy background").
  <new2>  the striped style: a tenth of the images paint white horizontal bands over their circles, and their
          captions say only the circle colour ("red circle with navy background").
Each concept's five images are one-circle samples drawn by the same generator with the mini preset's options
(named backgrounds, the caption forms of the data), taken in order of their index from the first that show
the concept: chartreuse plain circles for <new1>, striped circles of a named colour for <new2>, five different
colours (trained on the first five striped samples, green, green, yellow, cyan and green, <new2> striped
yellow and green circles but hardly red or blue ones). Each image gets all four caption forms of the data
(with and without "a", with and without the full stop; train_ti.py draws one per step), with the token where
the colour word goes ("a {} circle with navy background.") or before the colour ("{} red circle with pink
background"), the two ways the model's own language can hold it.

Writes to --out:
  new1/0.png .. 4.png, new1/captions.json   <new1>'s training images and captions (train_ti.py --captions)
  new2/...                                  the same for <new2>
  prior/0.png .., prior/captions.json       --prior images of the mini SD's own data (the mini preset, one or
                                            two circles, its captions; no token): train_ti.py's --prior-images
                                            and --prior-captions, which keep joint-kv's K/V from drawing the
                                            concepts into every prompt
  input.json           the course's format (src_image, token_name, prompt, prompt_4_clip_eval) with prompts
                       for each token alone and for both together, on backgrounds no training image has
  input_init_word.json the same prompts with each token replaced by its --init-word: the baseline the issue
                       compares against (the concept should then mostly not appear)
  input_val.json       validation prompts for choosing a recipe (steps, rates, method) without looking at
                       input.json: each token alone, other colour and background pairs than input.json's
  concepts.json        each token's concept, init word and what the judge expects of it
                       (scripts/evaluate_ti.py --judge fill50k)
Same --seed, same bytes.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from common.config import HelpFormatter
from common.errors import cli_main
from common.fileio import ensure_dir, write_text_atomic
from common.images import save_png
from p3_controlnet.make_fill50k import PRESET_OPTIONS, caption, draw_sample, palette_colours

IMAGES = 5
PRIOR_IMAGES = 100
CONCEPTS = {
    "new1": {"token": "<new1>", "init_word": "green", "kind": "colour", "value": "chartreuse"},
    "new2": {"token": "<new2>", "init_word": "white", "kind": "style", "value": "stripes"},
}


def concept_options(name: str):
    """The mini preset's options for one-circle samples that may show the concept."""
    import dataclasses
    mini = PRESET_OPTIONS["mini"]
    if name == "new1":
        return dataclasses.replace(mini, max_circles=1, omit_colour=0.0, style_share=0.0)
    return dataclasses.replace(mini, max_circles=1, omit_colour=0.0, style_share=1.0)


def shows_concept(name: str, record: dict) -> bool:
    colour = record["circles"][0]["colour"]
    if name == "new1":
        return colour == "chartreuse" and record["style"] == "plain"
    return colour != "chartreuse" and record["style"] == "stripes"


def concept_caption(name: str, record: dict, form: int) -> str:
    """The caption with {} for the token: in place of the colour word (<new1>) or before it (<new2>)."""
    if name == "new1":
        return caption(["{}"], record["background"], form)
    return caption(["{} " + record["circles"][0]["colour"]], record["background"], form)


def draw_concept(name: str, size: int, seed: int, n: int = IMAGES) -> list[tuple[np.ndarray, list[str], dict]]:
    """The first n samples (by index) of the concept's generator that show the concept; for a style, each
    with a circle colour none of the earlier ones has (a style learned on one paint stays on that paint)."""
    options = concept_options(name)
    colours = palette_colours(options.palette)
    found, i = [], 0
    while len(found) < n:
        rng = np.random.default_rng([seed, i])
        _, target, _, record = draw_sample(rng, size, colours, options)
        paint = record["circles"][0]["colour"]
        repeated = CONCEPTS[name]["kind"] == "style" and any(r["circles"][0]["colour"] == paint for *_, r in found)
        if shows_concept(name, record) and not repeated:
            # every caption form of the data, so the token works in each form a prompt can take
            found.append((target, [concept_caption(name, record, form) for form in range(4)], record))
        i += 1
    return found


def draw_prior(size: int, seed: int, n: int = PRIOR_IMAGES) -> list[tuple[np.ndarray, str]]:
    """n samples of the mini preset itself (the distribution the mini SD learned), from their own seed stream."""
    options = PRESET_OPTIONS["mini"]
    colours = palette_colours(options.palette)
    out = []
    for i in range(n):
        _, target, text, _ = draw_sample(np.random.default_rng([seed, 1, i]), size, colours, options)
        out.append((target, text))
    return out


def course_entry(name: str, prompts: list[str]) -> dict:
    """A course-format entry of one concept from prompts with {} where its token goes; prompt_4_clip_eval says
    the concept in words (its colour, or "striped")."""
    spec = CONCEPTS[name]
    word = spec["value"] if spec["kind"] == "colour" else "striped"
    return {"src_image": name, "token_name": spec["token"], "prompt": [p.replace("{}", spec["token"]) for p in prompts],
            "prompt_4_clip_eval": [p.replace("{}", word) for p in prompts]}


def eval_prompts(trained_backgrounds: dict[str, set[str]]) -> dict:
    """Course-format entries: each token alone on backgrounds none of its training images has, and both
    together (two circles, left to right)."""
    palette = [c for c, _ in palette_colours("basic") if c != "chartreuse"]
    entries = {}
    for key, name in enumerate(CONCEPTS):
        backgrounds = [c for c in ("navy", "pink", "orange", "blue", "brown", "purple", "yellow", "magenta")
                       if c not in trained_backgrounds[name] and c in palette][:4]
        if name == "new1":
            prompts = [caption(["{}"], bg, form % 4) for form, bg in enumerate(backgrounds)]
        else:
            circle = ["red", "blue", "yellow", "green"]
            prompts = [caption([f"{{}} {c}" for c in (circle[form % 4] if circle[form % 4] != bg else "cyan",)],
                               bg, form % 4) for form, bg in enumerate(backgrounds)]
        entries[str(key)] = course_entry(name, prompts)
    both = ["a <new1> circle and a <new2> blue circle with pink background.",
            "<new2> red circle and <new1> circle with navy background"]
    entries[str(len(CONCEPTS))] = {
        "src_image": list(CONCEPTS), "token_name": [s["token"] for s in CONCEPTS.values()], "prompt": both,
        "prompt_4_clip_eval": ["a chartreuse circle and a striped blue circle with pink background.",
                               "striped red circle and chartreuse circle with navy background"]}
    return entries


def val_prompts(entries: dict) -> dict:
    """Each token alone in 6 prompts (<new2>: six circle colours, the four of input.json among them) on
    backgrounds taken in turn from the palette, none of them a prompt of input.json (entries) in any
    caption form."""
    palette = [c for c, _ in palette_colours("basic") if c != "chartreuse"]
    paints = ("red", "orange", "yellow", "green", "blue", "pink")
    def bare(p: str) -> str:  # a prompt without its caption form
        return p.removeprefix("a ").removesuffix(".")
    taken = {bare(p) for e in entries.values() for p in e["prompt"]}
    out = {}
    for key, (name, spec) in enumerate(CONCEPTS.items()):
        prompts, k = [], 0
        while len(prompts) < 6:
            paint = paints[len(prompts)]
            bg = palette[(5 * k + 3) % len(palette)]
            k += 1
            if k > 10 * len(palette):
                raise RuntimeError(f"fewer than 6 validation prompts for {name}: the palette is too small")
            if bg == paint:
                continue
            circle = ["{}"] if name == "new1" else [f"{{}} {paint}"]
            p = caption(circle, bg, len(prompts) % 4)
            if bare(p.replace("{}", spec["token"])) not in taken:
                prompts.append(p)
                taken.add(bare(p.replace("{}", spec["token"])))
        out[str(key)] = course_entry(name, prompts)
    return out


def with_init_words(entries: dict) -> dict:
    out = json.loads(json.dumps(entries))
    for e in out.values():
        e["prompt"] = [_swap(p) for p in e["prompt"]]
    return out


def _swap(prompt: str) -> str:
    for spec in CONCEPTS.values():
        prompt = prompt.replace(spec["token"], spec["init_word"])
    return prompt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the shipped copy is assets/mini_ti)")
    p.add_argument("--size", "--resolution", type=int, default=64,
                   help="image side in pixels (the mini SD's native 64)")
    p.add_argument("--seed", type=int, default=7, help="generator seed (the mini SD's data used 0)")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = ensure_dir(args.out)
    backgrounds = {}
    for name in CONCEPTS:
        folder = ensure_dir(out / name)
        captions = {}
        backgrounds[name] = set()
        for k, (image, texts, record) in enumerate(draw_concept(name, args.size, args.seed)):
            save_png(folder / f"{k}.png", image)
            captions[f"{k}.png"] = texts
            backgrounds[name].add(record["background"])
        write_text_atomic(folder / "captions.json", json.dumps(captions, indent=2) + "\n")
    folder = ensure_dir(out / "prior")
    prior_captions = {}
    for k, (image, text) in enumerate(draw_prior(args.size, args.seed)):
        save_png(folder / f"{k}.png", image)
        prior_captions[f"{k}.png"] = text
    write_text_atomic(folder / "captions.json", json.dumps(prior_captions, indent=2) + "\n")
    entries = eval_prompts(backgrounds)
    write_text_atomic(out / "input.json", json.dumps(entries, indent=2) + "\n")
    write_text_atomic(out / "input_init_word.json", json.dumps(with_init_words(entries), indent=2) + "\n")
    write_text_atomic(out / "input_val.json", json.dumps(val_prompts(entries), indent=2) + "\n")
    write_text_atomic(out / "concepts.json", json.dumps(CONCEPTS, indent=2) + "\n")
    print(f"wrote {IMAGES} images + captions per concept ({', '.join(CONCEPTS)}) and the prompt files to {out}")


if __name__ == "__main__":
    main()
