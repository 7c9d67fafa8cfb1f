#!/usr/bin/env python
"""A procedural stand-in for the i-CLEVR images: 1-3 shaded objects of the 24 classes on a plain floor.

    python p1_ddpm/render_iclevr.py --out DIR --n 20000 --seed 0

Writes DIR/images/iclevr_XXXXXX.png (64x64 RGB), DIR/train.json (file name -> list of object names,
as the lab's train.json) and DIR/objects.json (name -> index, the lab's 24 classes). The label lists
are drawn like the lab's train.json: by default sampled from it (--labels-from, the shared copy when
present), otherwise 1, 2 or 3 distinct classes with equal probability (the lab's own proportions).

Objects: 8 colours x {cube (front, top and side faces), sphere (Lambert shading and a highlight),
cylinder (curved body and an elliptic top)}, on a light floor. Objects stand at random spots with
perspective scale (farther = smaller and higher), are kept apart so none hides another, and are
painted back to front. Everything is drawn with numpy on a 2x supersampled grid, a batch of images
at once, then box-filtered down to 64x64 (anti-aliased edges).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common.config import HelpFormatter, int_at_least
from common.errors import UserError, cli_main
from common.fileio import check_writable, ensure_dir, read_json, write_text_atomic
from common.paths import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN_JSON = SHARED_DATA / "iclevr" / "train.json"

COLOURS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder")
# the lab's objects.json: shape-major, colours in the order above
OBJECTS = {f"{c} {s}": k for k, (s, c) in enumerate((s, c) for s in SHAPES for c in COLOURS)}
MAX_OBJECTS = 3
IMAGE_SIZE = 64

RGB = np.array([
    (0.47, 0.47, 0.47),  # gray
    (0.80, 0.12, 0.10),  # red
    (0.14, 0.30, 0.88),  # blue
    (0.12, 0.60, 0.18),  # green
    (0.52, 0.32, 0.12),  # brown
    (0.52, 0.18, 0.72),  # purple
    (0.12, 0.80, 0.85),  # cyan
    (0.96, 0.84, 0.12),  # yellow
], dtype=np.float32)
FLOOR_NEAR, FLOOR_FAR = np.array((0.80, 0.79, 0.76), np.float32), np.array((0.66, 0.66, 0.65), np.float32)
LIGHT = np.array((-0.5, -0.6, 0.62), np.float32)
LIGHT /= np.linalg.norm(LIGHT)
SUPERSAMPLE = 2


def class_of(name: str, objects: dict[str, int] = OBJECTS) -> int:
    if name not in objects:
        raise UserError(f"unknown object name {name!r} (expected e.g. 'red sphere'; the 24 are in objects.json)")
    return objects[name]


def check_label_list(labels, where: str, objects: dict[str, int] = OBJECTS) -> list[int]:
    """Class indices of one label list; UserError naming `where` when it is not 1-3 distinct known objects."""
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise UserError(f"{where}: a label list must be a list of object names, got {labels!r}")
    if not 1 <= len(labels) <= MAX_OBJECTS:
        raise UserError(f"{where}: a label list holds 1-{MAX_OBJECTS} objects, got {len(labels)}: {labels}")
    if len(set(labels)) != len(labels):
        raise UserError(f"{where}: repeated object in {labels}")
    try:
        return [class_of(s, objects) for s in labels]
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def random_label_lists(n: int, rng: np.random.Generator) -> list[list[str]]:
    """1, 2 or 3 distinct classes with equal probability, classes uniform (the lab's proportions)."""
    names = list(OBJECTS)
    counts = rng.integers(1, MAX_OBJECTS + 1, size=n)
    return [[names[k] for k in rng.choice(len(names), size=c, replace=False)] for c in counts]


def label_lists_from(path: Path, n: int, rng: np.random.Generator) -> list[list[str]]:
    """n label lists drawn (with replacement) from a lab train.json, so the set distribution matches."""
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty object mapping file names to label lists")
    lists = list(data.values())
    for k, v in enumerate(lists):
        check_label_list(v, f"{path} entry {k}")
    return [list(lists[i]) for i in rng.integers(0, len(lists), size=n)]


def load_json(path: str | os.PathLike):
    return read_json(path)


def _layout(k: int, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """(k, 3) rows of [ground x, ground y, half size] in 64-px units, kept apart, sorted far to near."""
    for _ in range(tries):
        gy = rng.uniform(26, 60, size=k)
        gx = rng.uniform(11, 53, size=k)
        size = 5.5 + 3.5 * (gy - 26) / 34  # perspective: nearer (lower) objects are bigger
        ok = True
        for i in range(k):
            for j in range(i):
                # ellipse-ish separation: horizontal neighbours need the full widths, vertical ones less
                dx, dy = gx[i] - gx[j], (gy[i] - gy[j]) * 1.4
                if dx * dx + dy * dy < (1.05 * (size[i] + size[j])) ** 2:
                    ok = False
        if ok:
            order = np.argsort(gy)
            return np.stack([gx, gy, size], axis=1)[order]
    raise RuntimeError("could not place the objects")  # never with <= 3 objects in this room


def render_batch(classes: list[list[int]], rng: np.random.Generator) -> np.ndarray:
    """Render one image per list of class indices; returns (B, 64, 64, 3) uint8."""
    b = len(classes)
    s = SUPERSAMPLE
    hi = IMAGE_SIZE * s
    coords = (np.arange(hi, dtype=np.float32) + 0.5) / s
    ys, xs = coords[None, :, None], coords[None, None, :]  # (1, H, 1), (1, 1, W) in 64-px units

    # floor: a gentle far-to-near gradient, slightly varied per image
    t = (ys / IMAGE_SIZE)[..., None]  # (1, H, 1, 1)
    tint = rng.uniform(-0.03, 0.03, size=(b, 1, 1, 1)).astype(np.float32)
    img = np.broadcast_to(FLOOR_FAR + (FLOOR_NEAR - FLOOR_FAR) * t, (b, hi, 1, 3)) + tint
    img = np.repeat(img, hi, axis=2).astype(np.float32)

    params = np.zeros((b, MAX_OBJECTS, 5), np.float32)  # gx, gy, size, class, present
    for i, cl in enumerate(classes):
        lay = _layout(len(cl), rng)
        perm = rng.permutation(len(cl))  # which class stands where: random, independent of the list order
        for slot, (row, c) in enumerate(zip(lay, np.asarray(cl)[perm])):
            params[i, slot] = (*row, c, 1.0)
    # painted slot by slot; within an image the slots are sorted far to near
    for slot in range(MAX_OBJECTS):
        p = params[:, slot]
        present = p[:, 4] > 0
        if not present.any():
            continue
        idx = np.nonzero(present)[0]
        gx, gy, size = (p[idx, j][:, None, None] for j in range(3))
        cls = p[idx, 3].astype(int)
        shape, colour = cls // len(COLOURS), cls % len(COLOURS)
        mask, shade, spec = _draw_shapes(xs, ys, gx, gy, size, shape)
        base = RGB[colour][:, None, None, :]
        col = np.clip(base * shade[..., None] + spec[..., None], 0, 1)
        sub = img[idx]
        img[idx] = np.where(mask[..., None], col, sub)
    img = img.reshape(b, IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(2, 4))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _draw_shapes(xs, ys, gx, gy, size, shape):
    """Coverage mask, shade factor and additive highlight (each (n, H, W)) of one object per image."""
    n = gx.shape[0]
    hw = (n, ys.shape[1], xs.shape[2])
    mask = np.zeros(hw, bool)
    shade = np.ones(hw, np.float32)
    spec = np.zeros(hw, np.float32)

    # sphere resting on the floor: centre one radius above the ground point
    r = size
    dx, dy = (xs - gx) / r, (ys - (gy - r)) / r
    d2 = dx * dx + dy * dy
    nz = np.sqrt(np.clip(1 - d2, 0, 1))
    lam = np.clip(dx * LIGHT[0] + dy * LIGHT[1] + nz * LIGHT[2], 0, 1)
    m = (d2 <= 1) & (shape == 1)[:, None, None]
    mask |= m
    shade = np.where(m, 0.30 + 0.85 * lam, shade)
    refl = np.clip(2 * lam * nz - LIGHT[2], 0, 1)  # (R . V) with the viewer along +z
    spec = np.where(m, 0.45 * refl ** 24, spec)

    # cube: front square, top face above it and right side face, sheared up-right (oblique view)
    w = 0.82 * size
    dep = 0.55 * w
    left, right, bottom, top = gx - w, gx + w, gy, gy - 2 * w
    is_cube = (shape == 0)[:, None, None]
    front = (xs >= left) & (xs <= right) & (ys <= bottom) & (ys >= top)
    v = top - ys  # height above the front face's top edge
    top_face = (v >= 0) & (v <= dep) & (xs - v >= left) & (xs - v <= right)
    u = xs - right
    side = (u >= 0) & (u <= dep) & (ys + u >= top) & (ys + u <= bottom)
    for face, f in ((side, 0.55), (top_face, 1.18), (front, 0.88)):
        m = face & is_cube
        mask |= m
        shade = np.where(m, f, shade)

    # upright cylinder: body with cosine shading across it, elliptic bottom edge and lighter top ellipse
    rc = 0.8 * size
    b = 0.38 * rc
    height = 1.7 * rc
    cy_bottom, cy_top = gy - b, gy - b - height
    is_cyl = (shape == 2)[:, None, None]
    ex = (xs - gx) / rc
    body = (np.abs(ex) <= 1) & (ys >= cy_top) & ((ys <= cy_bottom) | (ex ** 2 + ((ys - cy_bottom) / b) ** 2 <= 1))
    cap = ex ** 2 + ((ys - cy_top) / b) ** 2 <= 1
    nx = np.clip(ex, -1, 1)
    body_shade = 0.35 + 0.8 * np.clip(nx * LIGHT[0] + np.sqrt(1 - nx * nx) * 0.8, 0, 1)
    m = body & is_cyl
    mask |= m
    shade = np.where(m, body_shade, shade)
    m = cap & is_cyl
    mask |= m
    shade = np.where(m, 1.15, shade)
    return mask, shade, spec


def render(label_lists: list[list[str]], seed: int, batch: int = 500) -> np.ndarray:
    """(N, 64, 64, 3) uint8 images for the label lists; image i depends only on (seed, i, its labels)."""
    classes = [check_label_list(v, f"label list {i}") for i, v in enumerate(label_lists)]
    out = np.empty((len(classes), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for start in range(0, len(classes), batch):
        rng = np.random.default_rng([seed, start // batch])
        out[start:start + batch] = render_batch(classes[start:start + batch], rng)
    return out


def write_dataset(out: Path, label_lists: list[list[str]], seed: int, prefix: str = "iclevr") -> dict[str, list[str]]:
    """Render and write DIR/images/*.png, DIR/train.json and DIR/objects.json; returns the train.json dict."""
    from PIL import Image
    images = render(label_lists, seed)
    ensure_dir(out / "images")
    names = [f"{prefix}_{i:06d}.png" for i in range(len(label_lists))]
    for name, im in zip(names, images):
        Image.fromarray(im).save(out / "images" / name, format="PNG", compress_level=1)
    labels = dict(zip(names, label_lists))
    write_text_atomic(out / "objects.json", json.dumps(OBJECTS) + "\n")
    write_text_atomic(out / "train.json", json.dumps(labels) + "\n")
    return labels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (images/, train.json, objects.json)")
    p.add_argument("--n", type=int_at_least(1), default=18009, help="number of images (the lab's train set has 18009)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label draw and the scene layouts")
    p.add_argument("--labels-from", default="auto",
                   help="a lab train.json to draw label lists from; 'auto': ../shared/data/iclevr/train.json "
                        "when present, else random; 'random': 1-3 distinct uniform classes")
    p.add_argument("--prefix", default="iclevr", help="file-name prefix: PREFIX_000000.png, ...")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not args.prefix or any(c in args.prefix for c in "/\\") or args.prefix.startswith("."):
        raise UserError(f"--prefix must be a plain file-name prefix (no '/', not starting with '.'), "
                        f"got {args.prefix!r}")
    out = check_writable(args.out)
    rng = np.random.default_rng([args.seed, 991])
    source = args.labels_from
    if source == "auto":
        source = str(SHARED_TRAIN_JSON) if SHARED_TRAIN_JSON.is_file() else "random"
    lists = random_label_lists(args.n, rng) if source == "random" else label_lists_from(Path(source), args.n, rng)
    t0 = time.time()
    write_dataset(out, lists, args.seed, args.prefix)
    print(f"wrote {args.n} images to {out / 'images'} with train.json and objects.json "
          f"(labels from {source}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
