#!/usr/bin/env python
"""Generate a Fill50k-style data set in the course layout.

    python p3_controlnet/make_fill50k.py --out hw2_data/fill50k --n 50000 --size 512 --seed 0

Writes OUT/training/{source,target}/<i>.png and OUT/training/prompt.json (one JSON object a line:
{"source": "<i>.png", "target": "<i>.png", "prompt": ...}); --n-test N also writes OUT/testing/ the same way.
Each sample, as in Fill50k (the ControlNet authors' toy set): a random circle (centre, radius); the
control image (source) is its outline, white on black; the target is the circle filled with one random
named colour on a background of another; the prompt is "<circle colour> circle with <background colour>
background", with the CSS/X11 colour names split into words ("lightgoldenrodyellow" -> "light golden rod yellow").
Same --seed, same bytes.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageColor, ImageDraw  # noqa: E402

from common.errors import UserError, cli_main  # noqa: E402
from common.fileio import check_writable, ensure_dir, write_text_atomic  # noqa: E402
from common.images import save_png  # noqa: E402

# the words the CSS colour names are built from; a name that is not a sequence of these stays one word
# ("aquamarine", "gainsboro", "moccasin")
COLOUR_WORDS = (
    "alice antique almond blanched blue blush brick brown burly cadet chiffon cornflower cream cyan dark deep dim "
    "dodger drab fire floral forest ghost golden gray green hot indian lace lavender lawn lemon light lime linen "
    "medium midnight mint misty navajo navy old olive orange orchid pale papaya peach pink powder puff purple red "
    "rebecca rod rose rosy royal saddle salmon sandy sea sky slate smoke spring steel turquoise violet whip white wood yellow"
).split()


def split_colour_name(name: str) -> str:
    """'lightgoldenrodyellow' -> 'light golden rod yellow'; names that do not split stay whole."""
    words = set(COLOUR_WORDS)

    @functools.lru_cache(maxsize=None)
    def best(i: int):
        if i == len(name):
            return ()
        options = [(name[i:j],) + rest for j in range(i + 1, len(name) + 1)
                   if name[i:j] in words and (rest := best(j)) is not None]
        return min(options, key=len) if options else None

    parts = best(0)
    if parts is None:  # e.g. "mediumaquamarine": split off known leading words, keep the rest whole
        for w in sorted(words, key=len, reverse=True):
            if name.startswith(w) and len(name) > len(w):
                return f"{w} {split_colour_name(name[len(w):])}"
        return name
    return " ".join(parts)


def named_colours() -> list[tuple[str, tuple[int, int, int]]]:
    """(spoken name, RGB) for every CSS colour name; 'grey' spellings dropped (they repeat 'gray')."""
    out = []
    for name in sorted(ImageColor.colormap):
        if "grey" in name:
            continue
        out.append((split_colour_name(name), tuple(ImageColor.getrgb(name)[:3])))
    return out


def draw_sample(rng: np.random.Generator, size: int, colours) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """One (source, target, prompt, circle) sample."""
    radius = rng.uniform(0.06, 0.3) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    ci, bi = rng.integers(len(colours), size=2)
    (cname, crgb), (bname, brgb) = colours[ci], colours[bi]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    width = max(1, round(size / 128))
    source = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(source).ellipse(box, outline=(255, 255, 255), width=width)
    target = Image.new("RGB", (size, size), brgb)
    ImageDraw.Draw(target).ellipse(box, fill=crgb)
    circle = {"cx": round(cx, 2), "cy": round(cy, 2), "r": round(radius, 2)}
    return np.asarray(source), np.asarray(target), f"{cname} circle with {bname} background", circle


def write_split(root: Path, n: int, size: int, seed: int, start: int = 0) -> None:
    colours = named_colours()
    src_dir, tgt_dir = ensure_dir(root / "source"), ensure_dir(root / "target")
    lines = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])  # sample i depends only on (seed, i)
        source, target, prompt, _ = draw_sample(rng, size, colours)
        save_png(src_dir / f"{i}.png", source)
        save_png(tgt_dir / f"{i}.png", target)
        lines.append(json.dumps({"source": f"{i}.png", "target": f"{i}.png", "prompt": prompt}))
    write_text_atomic(root / "prompt.json", "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data root; training/ (and testing/) are written under it")
    p.add_argument("--n", type=int, default=50000, help="training samples (Fill50k has 50000)")
    p.add_argument("--n-test", type=int, default=0, help="testing samples (different seeds from training)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (SD v1: 512; a multiple of 8)")
    p.add_argument("--seed", type=int, default=0)
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.n_test < 0:
        raise UserError(f"--n must be >= 1 and --n-test >= 0, got {args.n} and {args.n_test}")
    if args.size < 16 or args.size % 8:
        raise UserError(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    out = check_writable(args.out)
    write_split(out / "training", args.n, args.size, args.seed)
    if args.n_test:
        # test samples draw from seeds no training sample uses
        write_split(out / "testing", args.n_test, args.size, args.seed + 1_000_003)
    print(f"wrote {args.n} training" + (f" and {args.n_test} testing" if args.n_test else "")
          + f" samples ({args.size}x{args.size}) to {out}")


if __name__ == "__main__":
    main()
