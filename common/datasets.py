"""The course's image-folder layout: `<root>/<name>/data/*.png` with `<root>/<name>/{train,val}.csv`.

Each csv has the header `image_name,label`. Images are decoded once into a uint8 tensor in memory
(the digit sets are small), so training reads no files after start-up. Every problem with the
file or the csv is reported as one line naming the file.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from common.errors import UserError
from common.fileio import folder_error

# the image files every folder lister accepts (compared case-insensitively); PNG_SUFFIXES for callers that
# compare or score PNGs only
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PNG_SUFFIXES = (".png",)


def read_label_csv(csv_path: str | os.PathLike) -> list[tuple[str, int]]:
    """Rows of an `image_name,label` csv; UserError on a missing file, bad header or bad label."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: label csv not found")
    try:
        # utf-8-sig: Excel writes a byte-order mark, which would otherwise spoil the header's first name
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{csv_path}: not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["image_name", "label"]:
        raise UserError(f"{csv_path}: expected header 'image_name,label', got {header!r}")
    rows, first_line = [], {}
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 2:
            raise UserError(f"{csv_path}:{lineno}: expected 'image_name,label', got {row!r}")
        try:
            rows.append((row[0].strip(), int(row[1])))
        except ValueError:
            raise UserError(f"{csv_path}:{lineno}: label {row[1]!r} is not an integer") from None
        # a name listed twice would be scored once, with whichever row a dict kept
        seen = first_line.setdefault(rows[-1][0], lineno)
        if seen != lineno:
            raise UserError(f"{csv_path}:{lineno}: {rows[-1][0]!r} is listed again (first on line {seen})")
    if not rows:
        raise UserError(f"{csv_path}: no rows")
    return rows


def to_8_bit(im: Image.Image) -> Image.Image:
    """A 16-bit grey image (PNG) as 8-bit grey, scaled 0..65535 -> 0..255: PIL's own convert clips it at 255
    instead, which turns nearly every pixel white. 16-bit colour PNGs PIL already reads as 8-bit RGB."""
    if not im.mode.startswith("I;16"):
        return im
    grey = np.asarray(im).astype(np.uint32)
    return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation tag says: a phone stores a portrait JPEG sideways with that tag,
    and PIL's decoder ignores it (rotated USPS digits fell from 92.5% to 27.5% read sideways). Apply it before
    anything that makes a new image (to_8_bit, convert), which drops the tag."""
    return ImageOps.exif_transpose(im)


def load_image(path: str | os.PathLike, size: int | None = None, mode: str = "RGB",
               resize: bool = False) -> np.ndarray:
    """Decode one image as (H,W,C) uint8. With `size`, a different size is an error unless `resize`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            im = to_8_bit(upright(im)).convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    if size is not None and im.size != (size, size):
        if not resize:
            raise UserError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[..., None]


def list_images(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES, *,
                not_found: str | None = "folder not found",
                empty: str | None = "no images ({suffixes}) in folder") -> list[Path]:
    """The image files directly in `folder`, sorted by name: plain files whose suffix is one of `suffixes`
    (case-insensitive), skipping dot-files (such as the `._x.png` files macOS leaves on shared drives).

    The project's one image-folder lister. A missing folder raises UserError('<folder>: <not_found>') (a file
    there: '<folder>: is a file, not a folder'), a folder with no image UserError('<folder>: <empty>'), where
    '{suffixes}' in `empty` becomes the list of suffixes; pass None for either to get [] instead and report it
    in the caller's own words.
    """
    folder = Path(folder)
    suffixes = tuple(x.lower() for x in suffixes)
    if not folder.is_dir():
        if not_found is None:
            return []
        raise folder_error(folder, not_found)
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in suffixes and p.is_file())
    if not files and empty is not None:
        raise UserError(f"{folder}: {empty.replace('{suffixes}', ', '.join(suffixes))}")
    return files


class CourseImageFolder(Dataset):
    """One split of one course data set, decoded into memory.

    `root/name/data/<image_name>` listed by `root/name/<split>.csv`. Items are
    (uint8 tensor C,H,W, int label). `size` checks every image's size (resize=True resizes instead).
    """

    def __init__(self, root: str | os.PathLike, name: str, split: str = "train", size: int | None = 28,
                 resize: bool = False, mode: str = "RGB"):
        self.root = Path(root)
        self.name = name
        base = self.root / name
        if not self.root.is_dir():
            raise folder_error(self.root, "data folder not found")
        if not base.is_dir():
            raise folder_error(base, f"data set folder not found (expected {base}/data and {base}/{split}.csv)")
        rows = read_label_csv(base / f"{split}.csv")
        images = [load_image(base / "data" / fname, size=size, mode=mode, resize=resize) for fname, _ in rows]
        self.image_names = [fname for fname, _ in rows]
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.tensor([label for _, label in rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
