"""Tensor <-> image conversion, exact-name PNG writing and labelled image grids."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.fileio import all_or_nothing, atomic_path


def to_uint8(images: torch.Tensor, value_range: str = "minus1_1") -> np.ndarray:
    """(B,C,H,W) float tensor -> (B,H,W,C) uint8 array.

    value_range: 'minus1_1' (clamp to [-1,1]), 'zero_1' (clamp to [0,1]), or 'minmax' (each image
    scaled on its own so its min is 0 and its max is 255, as the course's DDIM problem does).
    """
    x = images.detach().to(torch.float32).cpu()
    if value_range == "minus1_1":
        x = (x.clamp(-1, 1) + 1) / 2
    elif value_range == "zero_1":
        x = x.clamp(0, 1)
    elif value_range == "minmax":
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    else:
        raise ValueError(f"unknown value_range {value_range!r}")
    # round-half-up, as torchvision's save_image does (x*255 + 0.5, truncated)
    arr = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write one (H,W,3) or (H,W) uint8 array as a PNG at exactly `path`, atomically."""
    if image.dtype != np.uint8:
        raise ValueError(f"save_png wants uint8, got {image.dtype}")
    img = Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_pngs(out: str | os.PathLike, names: Sequence[str], images: np.ndarray) -> None:
    """Write images[k] to out/names[k], all or nothing (common.fileio.all_or_nothing): if any write fails or
    the run is interrupted, no file is added or replaced. Inside a caller's all_or_nothing block, the files
    land when that block ends."""
    out = Path(out)
    with all_or_nothing():
        for name, img in zip(names, images, strict=True):
            save_png(out / name, img)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def make_grid(images: np.ndarray, rows: int, cols: int, row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, pad: int = 2, scale: int = 1,
              label_size: int = 12) -> Image.Image:
    """Tile (rows*cols, H, W, 3) uint8 images row-major into one picture with optional labels."""
    n, h, w = images.shape[:3]
    if n != rows * cols:
        raise ValueError(f"grid of {rows}x{cols} needs {rows * cols} images, got {n}")
    h, w = h * scale, w * scale
    font = _font(label_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
        return x1 - x0, y1 - y0

    left = (max(text_size(s)[0] for s in row_labels) + 2 * pad) if row_labels else 0
    top = (max(text_size(s)[1] for s in col_labels) + 3 * pad) if col_labels else 0
    canvas = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, c = divmod(k, cols)
        tile = Image.fromarray(images[k]).convert("RGB")
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        canvas.paste(tile, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    if row_labels:
        for r, s in enumerate(row_labels):
            tw, th = text_size(s)
            draw.text((pad, top + pad + r * (h + pad) + (h - th) // 2), s, fill="black", font=font)
    if col_labels:
        for c, s in enumerate(col_labels):
            tw, th = text_size(s)
            draw.text((left + pad + c * (w + pad) + (w - tw) // 2, pad), s, fill="black", font=font)
    return canvas


def save_grid(path: str | os.PathLike, images: np.ndarray, rows: int, cols: int, **kwargs) -> Path:
    """make_grid, written atomically as a PNG; returns the path."""
    grid = make_grid(images, rows, cols, **kwargs)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
