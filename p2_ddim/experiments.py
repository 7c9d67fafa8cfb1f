#!/usr/bin/env python
r"""Report figures for the face DDIM problem.

    python p2_ddim/experiments.py eta-grid --noise-dir hw2_data/face/noise --unet hw2_data/face/UNet.pt \
        --out figs/eta_grid.png
    python p2_ddim/experiments.py interpolate --mode slerp --noise-dir hw2_data/face/noise \
        --unet hw2_data/face/UNet.pt --out figs/slerp.png
    python p2_ddim/experiments.py interpolate --mode lerp  ... --out figs/lerp.png

eta-grid: rows eta = 0, 0.25, 0.5, 0.75, 1 (--etas), columns noises 00-03 (--noises), labelled. The fresh
noise of column NAME is drawn from --seed and NAME's number, so every row uses the same random stream.
interpolate: one row, alpha = 0.0, 0.1, ..., 1.0, between noises 00 and 01 (--pair), DDIM with eta 0;
slerp (spherical) or lerp (linear) interpolation of the initial noise. Images are min-max normalised each
on its own, as in hw2_2.sh. The sampling flags are those of p2_ddim/infer.py. Beside the figure, OUT.png.json
says what it shows, with the UNet, sampler, steps, seed and the command.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common.config import HelpFormatter, comma_list, float_in, int_at_least
from common.errors import UserError, cli_main
from common.figure_info import command_line, figure_out, write_figure_info
from common.images import save_grid, to_uint8
from p2_ddim.infer import add_sampling_args, load_model, load_noises, sample_faces_ddim, setup
from p2_ddim.interpolation import INTERPOLATIONS, interpolate

DEFAULT_ETAS = "0,0.25,0.5,0.75,1.0"
DEFAULT_NOISES = "00,01,02,03"


def _names(text: str, flag: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise UserError(f"{flag}: no noise names given")
    return [n[:-3] if n.endswith(".pt") else n for n in names]


def fmt(v: float) -> str:
    return f"{v:g}" if v != int(v) else f"{v:.1f}"


def eta_grid(args, model, device, amp, stems, noises, indices) -> tuple[np.ndarray, list[str], list[str]]:
    rows = []
    for eta in args.etas:
        imgs = sample_faces_ddim(model, noises, indices, steps=args.steps, eta=eta, seed=args.seed,
                                 timestep_offset=args.timestep_offset, clip_x0=args.clip_x0,
                                 batch_size=args.batch_size, device=device, amp_dtype=amp, progress=not args.quiet,
                                 desc=f"eta {eta:g}")
        rows.append(to_uint8(imgs, "minmax"))
    return np.concatenate(rows), [f"eta = {fmt(e)}" for e in args.etas], stems


def interpolation_row(args, model, device, amp, noises) -> tuple[np.ndarray, list[str], list[str]]:
    alphas = [i / (args.count - 1) for i in range(args.count)]
    x_t = interpolate(noises[0], noises[1], alphas, args.mode)
    imgs = sample_faces_ddim(model, x_t, list(range(len(alphas))), steps=args.steps, eta=0.0,
                             timestep_offset=args.timestep_offset, clip_x0=args.clip_x0, batch_size=args.batch_size,
                             device=device, amp_dtype=amp, progress=not args.quiet, desc=args.mode)
    return to_uint8(imgs, "minmax"), [args.mode], [f"{a:.1f}" if args.count == 11 else f"{a:.3g}" for a in alphas]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("eta-grid", "rows of eta, columns of noises"),
                        ("interpolate", "one row of images from interpolated noises")):
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        s.add_argument("--noise-dir", required=True, help="folder of NAME.pt noise tensors")
        s.add_argument("--unet", required=True, help="the course's UNet.pt")
        s.add_argument("--out", required=True, help="PNG file to write")
        s.add_argument(
            "--scale", type=float_in(1 / 16, 4), default=1.0,
            help="tile size factor, 1/16 to 4 (0.5 shrinks 256x256 tiles to 128x128)"
        )
        if name == "eta-grid":
            s.add_argument("--etas", type=comma_list(float_in(0)), default=DEFAULT_ETAS,
                           help="comma-separated eta values (rows), each >= 0")
            s.add_argument("--noises", default=DEFAULT_NOISES, help="comma-separated noise names (columns)")
        else:
            s.add_argument("--mode", choices=tuple(INTERPOLATIONS), required=True, help="slerp or lerp")
            s.add_argument("--pair", default="00,01", help="the two noise names to interpolate between")
            s.add_argument("--count", type=int_at_least(2), default=11,
                           help="images in the row (11: alpha 0.0, 0.1, ..., 1.0)")
        add_sampling_args(s, fresh_noise=name == "eta-grid")  # interpolate samples at eta 0 only
    return p


def _resize(images: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return images
    from PIL import Image
    h, w = images.shape[1:3]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.LANCZOS)) for im in images])


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = figure_out(args.out)
    if args.command == "eta-grid":
        stems, noises, indices = load_noises(args.noise_dir, _names(args.noises, "--noises"))
    else:
        pair = _names(args.pair, "--pair")
        if len(pair) != 2:
            raise UserError(f"--pair needs two noise names, got {args.pair!r}")
        _, noises, _ = load_noises(args.noise_dir, pair)
    device, amp = setup(args)
    model = load_model(args.unet, device)  # after the cheap checks: a bad noise folder fails at once
    if args.command == "eta-grid":
        images, row_labels, col_labels = eta_grid(args, model, device, amp, stems, noises, indices)
    else:
        images, row_labels, col_labels = interpolation_row(args, model, device, amp, noises)
    images = _resize(images, args.scale)
    save_grid(out, images, len(row_labels), len(col_labels), row_labels=row_labels, col_labels=col_labels,
              label_size=max(10, images.shape[1] // 12))
    if args.command == "eta-grid":
        what = f"DDIM eta grid: rows eta = {', '.join(map(fmt, args.etas))}, columns noises " \
               f"{', '.join(col_labels)}"
    else:
        what = f"{args.mode} of the initial noise between {args.pair.replace(',', ' and ')}, alpha 0 to 1, DDIM eta 0"
    write_figure_info(out, what, command_line(__file__, argv), unet=args.unet, sampler="ddim", steps=args.steps,
                      seed=getattr(args, "seed", None))
    print(f"wrote {out} ({len(row_labels)}x{len(col_labels)}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
