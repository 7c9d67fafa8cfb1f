#!/usr/bin/env python
"""Report figure of textual inversion: the first images of every prompt of input.json, one row a prompt.

    python p5_personalization/report.py --json assets/mini_ti/input.json --output-dir OUT --out fig.png
    python p5_personalization/report.py --json input.json --output-dir OUT_TI --output-dir OUT_JOINT \\
        --label ti --label joint-kv --out fig.png          # two runs side by side, per prompt

Reads the course layout that hw2_ti.sh / infer_ti.py writes (OUT/<entry>/<prompt index>/
source<entry>_prompt<prompt index>_<k>.png) and draws, for each prompt, its first --per-prompt images of
each --output-dir, labelled with the entry and prompt index; OUT.png.json lists the prompts in row order,
so the figure can be captioned without reading the JSON. Nothing is generated here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common.config import HelpFormatter, int_at_least
from common.datasets import upright
from common.errors import UserError, cli_main
from common.figure_info import command_line, figure_out, write_figure_info
from common.images import save_grid
from p5_personalization.concepts import read_input_json


def prompt_images(out_dir: Path, key: str, p: int, count: int) -> list[np.ndarray]:
    """The first `count` images of prompt p of entry `key`, read as RGB; a one-line error when any is missing."""
    folder = out_dir / key / str(p)
    images = []
    for k in range(count):
        path = folder / f"source{key}_prompt{p}_{k}.png"
        if not path.is_file():
            raise UserError(f"{path}: image not found (generate with hw2_ti.sh, at least --per-prompt images)")
        try:
            with Image.open(path) as im:
                images.append(np.asarray(upright(im).convert("RGB")))
        except OSError as e:
            raise UserError(f"{path}: not a readable image ({e})") from None
    return images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--json", required=True, help="the course's input.json the images were generated from")
    p.add_argument("--output-dir", action="append", required=True,
                   help="folder hw2_ti.sh wrote (repeat to put runs side by side)")
    p.add_argument("--label", action="append", default=None,
                   help="column-group label per --output-dir (default: the folder names)")
    p.add_argument("--per-prompt", type=int_at_least(1), default=4, help="images shown per prompt and run")
    p.add_argument("--out", required=True, help="figure path (.png)")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = figure_out(args.out)
    dirs = [Path(d) for d in args.output_dir]
    labels = args.label or [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise UserError(f"{len(labels)} --label for {len(dirs)} --output-dir")
    cases = read_input_json(args.json)
    tiles, row_labels, rows = [], [], []
    for case in cases:
        for p, prompt in enumerate(case.prompts):
            for d in dirs:
                tiles.extend(prompt_images(d, case.key, p, args.per_prompt))
            row_labels.append(f"{case.key}/{p}")
            rows.append({"row": f"{case.key}/{p}", "prompt": prompt})
    sizes = {t.shape for t in tiles}
    if len(sizes) != 1:
        raise UserError(f"{', '.join(map(str, dirs))}: images of different sizes {sorted(sizes)}")
    cols = args.per_prompt * len(dirs)
    col_labels = [f"{label} {k}" if len(dirs) > 1 else str(k) for label in labels for k in range(args.per_prompt)]
    side = tiles[0].shape[0]
    save_grid(out, np.stack(tiles), len(rows), cols, row_labels=row_labels, col_labels=col_labels,
              scale=max(1, 128 // side))
    runs = ", ".join(f"{label}: {d}" for label, d in zip(labels, dirs))
    write_figure_info(out, f"textual inversion, first {args.per_prompt} images per prompt ({runs}); "
                           f"rows entry/prompt index", command_line(__file__, argv), rows=rows)
    print(f"wrote {out}: {len(rows)} prompts x {cols} images")


if __name__ == "__main__":
    main()
