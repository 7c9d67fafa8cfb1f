#!/usr/bin/env python
"""Generate the course's textual-inversion images: 25 per prompt of input.json, with the learned tokens.

    python p5_personalization/infer_ti.py --json hw2_data/textual_inversion/input.json --out OUT \\
        --sd sd-v1-4.ckpt --embeddings checkpoints/textual_inversion
    bash hw2_ti.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR]          # the same, as the course runs it

Writes OUT/<concept>/<prompt index>/source<concept>_prompt<prompt index>_<k>.png, k = 0..24, at the SD's
native size (512x512 for SD v1.4, 64x64 for the mini SD) unless --resolution says otherwise.
Every <token> that a prompt or token_name mentions is loaded from EMBEDDINGS_DIR/<token name>.safetensors
(what train_ti.py --out writes: '<new1>' -> new1.safetensors), so prompts holding several learned tokens
work. If EMBEDDINGS_DIR also holds cross_attn_kv.safetensors (train_ti.py --method joint-kv), the UNet's
cross-attention keys/values are replaced by the jointly fine-tuned ones (--no-kv: do not).
Sampling: DDIM (LDM's grid), 50 steps, classifier-free guidance 7.5 against the empty prompt, eta 0;
image k of prompt p starts from noise seeded by (--seed, concept key, p, k) only, so an image does not
depend on --batch-size (to the bit on the CPU: common.seeding.BATCH_QUANTUM), on the other prompts or on where
its concept stands in input.json.
bf16 on CUDA GPUs from Ampere on, else exact fp32.
"""
from __future__ import annotations

import argparse
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import common.stable_diffusion as sdlib
from common.config import HelpFormatter, finite_float, int_at_least
from common.device import (
    add_device_flag,
    add_precision_flag,
    autocast,
    autocast_dtype,
    channels_last_pays,
    pick_device,
    setup_cuda_fast_math,
)
from common.errors import UserError, cli_main
from common.fileio import all_or_nothing, check_writable, prune_outputs, remove_stale_temps
from common.images import save_pngs, to_uint8
from common.seeding import sample_seed
from p5_personalization.concepts import read_input_json, token_file_stem
from p5_personalization.textual_inversion import KV_FILE, add_tokens, expand_prompt, load_embedding, load_kv

REPO = Path(__file__).resolve().parents[1]

DEFAULT_EMBEDDINGS = REPO / "checkpoints" / "textual_inversion"
IMAGES_PER_PROMPT = 25


def is_prompt_image(folder: str, name: str) -> bool:
    """Whether `name` in OUT/`folder` is an image this command writes: KEY/P/sourceKEY_promptP_k.png (a copy
    of one under another folder, a user's backup, is not)."""
    key, _, p = folder.rpartition(os.sep)
    return bool(key) and p.isdigit() and re.fullmatch(rf"source{re.escape(key)}_prompt{p}_\d+\.png", name) is not None


def how_to_train(emb_dir: Path, token: str = "<new1>") -> str:
    return (f"train it first: python p5_personalization/train_ti.py --sd SD_CKPT --images <the concept's photos> "
            f"--token '{token}' --init-word <a word for it> --out {emb_dir}")


def find_embeddings(emb_dir: Path, tokens: list[str]) -> dict[str, Path]:
    if not emb_dir.is_dir():
        raise UserError(f"{emb_dir}: learned-embeddings folder not found; {how_to_train(emb_dir, tokens[0])} "
                        f"(once per token_name), or pass the folder as EMBEDDINGS_DIR")
    files = {}
    for t in tokens:
        f = emb_dir / f"{token_file_stem(t)}.safetensors"
        if not f.is_file():
            raise UserError(f"{f}: no learned embedding for {t}; {how_to_train(emb_dir, t)}")
        files[t] = f
    return files


def concept_number(key: str) -> int:
    """A number for a concept's key (not its position in input.json): the key itself for a plain integer
    ("0", "1", ...: the course's keys, which keeps their images), else 10**6 + CRC-32 of the key."""
    if key.isdigit() and key == str(int(key)) and int(key) < 10**6:
        return int(key)
    return 10**6 + zlib.crc32(key.encode("utf-8"))


def image_seed(seed: int, key: str, prompt_index: int, k: int) -> int:
    return sample_seed(seed, (concept_number(key) * 1000 + prompt_index) * 1000 + k)


@torch.no_grad()
def sample_ti_images(sd, text: str, seeds: list[int], resolution: int = 512, steps: int = 50, guidance: float = 7.5,
                     negative: str = "", batch_size: int = 25, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """P5: SD images of one (already expanded) prompt, with the learned token embeddings already added to
    `sd`. (len(seeds), H, W, 3) uint8; image i starts from noise seeded by seeds[i] only. Sampling and
    decoding run under autocast to `amp_dtype` (None: exact fp32)."""
    device = sd.unet.device
    f = sd.vae_scale_factor
    shape = (sd.unet.config.in_channels, resolution // f, resolution // f)
    sched = sdlib.make_ddim_scheduler(sd.noise_scheduler)
    cond1 = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [text], device).to(sd.unet.dtype)
    uncond1 = sdlib.encode_prompts(sd.tokenizer, sd.text_encoder, [negative], device).to(sd.unet.dtype)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        lat = sdlib.initial_latents(chunk, shape, device)  # fp32 x_T whatever the UNet's dtype, as P3's
        with autocast(device, amp_dtype):
            lat = sdlib.sample_latents(sd.unet, sched, lat, cond1.expand(len(chunk), -1, -1),
                                       uncond1.expand(len(chunk), -1, -1), steps=steps, guidance=guidance)
            out.append(to_uint8(sdlib.decode_latents(sd.vae, lat)))
    return np.concatenate(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--json", required=True, help='input.json: {"0": {"src_image", "token_name", "prompt": [...]}, ...}')
    p.add_argument("--out", required=True, help="output folder (OUT/<concept>/<prompt index>/*.png)")
    p.add_argument(
        "--sd", required=True, help="Stable Diffusion v1.x: sd-v1-4.ckpt / .safetensors or a diffusers folder"
    )
    p.add_argument(
        "--embeddings",
        default=str(DEFAULT_EMBEDDINGS),
        help="folder of learned embeddings written by train_ti.py --out (default: checkpoints/textual_inversion)",
    )
    p.add_argument("--no-kv", action="store_true", help=f"ignore {KV_FILE} in the embeddings folder")
    p.add_argument("--images-per-prompt", type=int_at_least(1), default=IMAGES_PER_PROMPT,
                   help="images generated for each prompt")
    p.add_argument("--steps", type=int_at_least(1), default=50, help="DDIM steps")
    p.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of classifier-free guidance")
    p.add_argument("--resolution", "--size", type=int, default=None,
                   help="image side, a multiple of 8 (default: the SD's native resolution, 512 for SD v1.4, 64 for "
                        "the mini SD)")
    p.add_argument("--batch-size", type=int_at_least(1), default=25, help="images per UNet batch (x2 with guidance)")
    p.add_argument("--only", nargs="+", default=None, help="generate only these concepts (keys of input.json)")
    add_device_flag(p)
    add_precision_flag(p, what="the UNet and VAE (their weights are held in bf16 too)")
    p.add_argument("--seed", type=int, default=0,
                   help="image k of prompt p starts from noise seeded by (seed, concept key, p, k)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_main(sigterm=True)
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError("--resolution must be a positive multiple of 8")
    cases = read_input_json(args.json)
    if args.only:
        unknown = sorted(set(args.only) - {c.key for c in cases})
        if unknown:
            raise UserError(f"--only {unknown[0]}: not a key of {args.json}")
    tokens = []
    for c in cases:
        if args.only and c.key not in args.only:
            continue
        tokens += [t for t in c.prompt_tokens() if t not in tokens]
    emb_dir = Path(args.embeddings)
    files = find_embeddings(emb_dir, tokens)
    learned = dict(load_embedding(f, t) for t, f in files.items())
    out = check_writable(args.out)  # writes and removes a probe file: fails now, not after minutes of sampling
    jobs = [(c, p) for c in cases if not args.only or c.key in args.only for p in range(len(c.prompts))]
    remove_stale_temps(*(out / c.key / str(p) for c, p in jobs))  # what a killed earlier run left
    device = pick_device(args.device)
    setup_cuda_fast_math()
    amp = autocast_dtype(device, args.precision)

    if args.quiet:
        sdlib.quiet_libraries()
    sd = sdlib.load_sd(args.sd).freeze()
    sdlib.check_sampling_steps(args.steps, sd)
    resolution = args.resolution or sd.native_resolution
    add_tokens(sd.tokenizer, sd.text_encoder, learned)
    kv_note = ""
    if (emb_dir / KV_FILE).is_file() and not args.no_kv:
        n = load_kv(emb_dir / KV_FILE, sd.unet)
        kv_note = f", joint cross-attention K/V ({n} tensors) from {emb_dir / KV_FILE}"
    if amp is not None:
        sdlib.cast(sd.unet, amp)
        sdlib.cast(sd.vae, amp)
    sd.to(device)
    if channels_last_pays(device):
        sd.unet.to(memory_format=torch.channels_last)
    num_vectors = {t: len(v) for t, v in learned.items()}
    print(f"{len(tokens)} learned token(s) {', '.join(f'{t} ({num_vectors[t]} vectors)' for t in tokens)} "
          f"from {emb_dir}{kv_note}", flush=True)

    written = 0
    t0 = time.perf_counter()
    n = args.images_per_prompt
    with all_or_nothing():  # every image lands at the end: a failure or SIGTERM adds no file and no folder
        for case, p in tqdm(jobs, desc="prompts", disable=args.quiet):
            images = sample_ti_images(
                sd,
                expand_prompt(case.prompts[p], num_vectors),
                [image_seed(args.seed, case.key, p, k) for k in range(n)],
                resolution,
                args.steps,
                args.guidance,
                args.negative_prompt,
                args.batch_size,
                amp,
            )
            save_pngs(out / case.key / str(p), [f"source{case.key}_prompt{p}_{k}.png" for k in range(n)], images)
            written += n
    # an earlier run into this folder (more images per prompt, more prompts or concepts) must not leave images
    # the grader would read too; with --only, only the folders of the prompts written now are this run's
    folders = {os.path.join(c.key, str(p)) for c, p in jobs}
    if not args.only:
        folders |= {str(d.relative_to(out)) for d in out.glob("*/*") if d.is_dir()}
        folders |= {d.name for d in out.iterdir() if d.is_dir()}
    names = [os.path.join(c.key, str(p), f"source{c.key}_prompt{p}_{k}.png") for c, p in jobs for k in range(n)]
    # deepest first, so a prompt folder emptied by this is gone before its concept folder is tried
    prune_outputs(out, names, sorted(folders, key=lambda s: -s.count(os.sep)), is_prompt_image)
    secs = time.perf_counter() - t0
    print(f"wrote {written} images ({len(jobs)} prompts x {args.images_per_prompt}) to {out} in {secs:.1f} s "
          f"({secs / max(1, len(jobs)):.1f} s per prompt)")
    return {"images": written, "prompts": len(jobs), "seconds": secs}


if __name__ == "__main__":
    main()
