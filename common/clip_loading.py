"""CLIP from a local weights file, never downloaded: shared by P3 (the ControlNet CLIP score,
scripts/evaluate_controlnet.py) and P5 (the zero-shot classifier and the textual-inversion grader).

`load_clip(model, weights)` builds the open_clip architecture named by `model` (a built-in name such as
ViT-B-32, or a JSON file holding a model config) with random weights, then loads the state dict read
from `weights`:
  * OpenAI's TorchScript archives (ViT-B-32.pt, ViT-L-14.pt from the CLIP repository; their weights are
    fp16 and are loaded into an fp32 model),
  * open_clip checkpoints (.safetensors / .bin / .pt; a plain state dict, or one under 'state_dict').
A file whose tensors do not match the architecture fails with one line naming both.

OpenAI's models (and open_clip's re-releases of them) were trained with QuickGELU. `quick_gelu="auto"`
(`--quick-gelu auto`) turns it on for TorchScript archives, for file names containing "openai" and for
`-quickgelu` model names; other files (e.g. an OpenAI model re-saved as open_clip_pytorch_model.bin) need
`--quick-gelu on`, or the features are subtly wrong (accuracy drops by a few points; nothing fails).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import UserError, one_line

QUICK_GELU_CHOICES = ("auto", "on", "off")

# keys OpenAI's TorchScript archives carry beside the weights
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def add_clip_flags(parser, *, required: bool, weights_help: str = "",
                   aliases: tuple[str | None, str | None] | None = None) -> None:
    """The CLIP flags of every command that loads CLIP with `load_clip`, under one name each: --clip-weights
    (the local file), --clip-arch (its open_clip architecture) and --quick-gelu. `aliases` (weights, arch):
    the names a command gave them before (clip_zeroshot's --weights and --model), still accepted."""
    weights_alias, arch_alias = aliases or ((), ())
    parser.add_argument("--clip-weights", *([weights_alias] if weights_alias else []), dest="clip_weights",
                        required=required, default=None,
                        help="local CLIP weights: OpenAI's TorchScript .pt (ViT-B-32.pt) or an open_clip "
                             ".safetensors/.bin/.pt" + (f"; {weights_help}" if weights_help else ""))
    parser.add_argument("--clip-arch", *([arch_alias] if arch_alias else []), dest="clip_arch", default="ViT-B-32",
                        help="open_clip architecture of --clip-weights (ViT-B-32, ViT-L-14, ...) or a JSON file "
                             "with a model config")
    parser.add_argument("--quick-gelu", choices=QUICK_GELU_CHOICES, default="auto",
                        help="QuickGELU activations (OpenAI's models use them); auto: on for OpenAI's TorchScript "
                             "archives, file names containing 'openai' and -quickgelu architectures")


@dataclass
class ClipBundle:
    model: torch.nn.Module        # open_clip CLIP, eval mode, on `device`
    preprocess: Callable          # PIL image -> (3, S, S) normalised tensor
    tokenizer: Callable           # list[str] -> (N, context_length) long tensor
    name: str
    weights: str
    quick_gelu: bool
    device: torch.device


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is an OpenAI TorchScript archive) of a CLIP weights file (--clip-weights, named in errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: --clip-weights file not found (a local CLIP weights file; nothing is downloaded)")
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        elif _is_torchscript(path):
            jit = True
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is how OpenAI released CLIP
                warnings.simplefilter("ignore")
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip readers raise many different types
        raise UserError(f"{path}: not a readable CLIP weights file ({one_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: does not hold a CLIP state dict (a dict of tensors)")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    for k in _OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    return sd, jit


def _resolve_model_name(model: str) -> str:
    import open_clip
    if model.endswith(".json"):
        p = Path(model)
        if not p.is_file():
            raise UserError(f"{p}: model config file not found")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: malformed JSON model config ({e})") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise UserError(f"{p}: an open_clip model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
        open_clip.add_model_config(p)  # registered under the file's stem
        model = p.stem
    if model not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(model.lower()[:5])][:6]
        raise UserError(
            f"--clip-arch {model}: not an open_clip architecture (e.g. {', '.join(close) or 'ViT-B-32, ViT-L-14'}; "
            f"or a JSON config file)"
        )
    cfg = open_clip.get_model_config(model)
    text_cfg = cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg or "hf_model_name" in text_cfg:
        raise UserError(f"--clip-arch {model}: uses a Hugging Face text tower/tokenizer, which would be downloaded; "
                        f"use a CLIP architecture with open_clip's own tokenizer (e.g. ViT-B-32, ViT-L-14)")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        raise UserError(f"--clip-arch {model}: uses a timm image tower; only open_clip's own towers are supported "
                        "offline")
    return model


def _fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str, name: str) -> dict:
    from open_clip.model import convert_to_custom_text_state_dict
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    # buffers the model rebuilds itself (e.g. the causal attention mask) may be stored by TorchScript archives
    rebuilt = {n for n, _ in model.named_buffers()} - set(own)
    sd = {k: v for k, v in sd.items() if k not in rebuilt}
    if "logit_scale" in sd and "logit_scale" in own and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    if "logit_bias" in own and "logit_bias" not in sd:
        sd["logit_bias"] = torch.zeros_like(own["logit_bias"])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[:2]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        if bad:
            k = bad[0]
            detail.append(f"{len(bad)} of another shape (e.g. {k}: file {tuple(sd[k].shape)}, "
                          f"model {tuple(own[k].shape)})")
        raise UserError(f"{path}: weights do not fit the open_clip model {name}: {'; '.join(detail)} "
                        f"(pass the --clip-arch these weights belong to)")
    return {k: v.to(own[k].dtype) for k, v in sd.items()}


def load_clip(model: str, weights: str | os.PathLike, device: torch.device | str = "cpu",
              quick_gelu: str = "auto") -> ClipBundle:
    """An open_clip CLIP of architecture `model` with the weights in `weights`; never downloads.

    Errors name the flags of add_clip_flags (--clip-arch, --clip-weights), which every caller has."""
    import open_clip
    name = _resolve_model_name(model)
    sd, jit = read_clip_state_dict(weights)
    if quick_gelu == "auto":
        # -quickgelu architectures (and JSON configs) say so in their config
        use_qg = (jit or "openai" in Path(weights).name.lower()
                  or bool(open_clip.get_model_config(name).get("quick_gelu", False)))
    elif quick_gelu in ("on", "off"):
        use_qg = quick_gelu == "on"
    else:
        raise UserError(f"--quick-gelu must be auto, on or off, got {quick_gelu!r}")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(max(quiet, logging.ERROR))  # open_clip warns that the new model is random
    try:
        # quick_gelu as a model argument overrides the config both ways (force_quick_gelu can only turn it on)
        clip = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False,
                                      device="cpu", quick_gelu=use_qg)
    finally:
        logging.getLogger().setLevel(quiet)
    clip.load_state_dict(_fit_state_dict(clip, sd, str(weights), name), strict=True)
    device = torch.device(device)
    clip = clip.to(device).eval().requires_grad_(False)
    pcfg = open_clip.get_model_preprocess_cfg(clip)
    preprocess = open_clip.image_transform(clip.visual.image_size, is_train=False, mean=pcfg.get("mean"),
                                           std=pcfg.get("std"))
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(clip, preprocess, tokenizer, name, str(weights), use_qg, device)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit-norm fp32 text embeddings."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[i:i + batch_size])).to(bundle.device)
        out.append(F.normalize(bundle.model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 3, S, S) preprocessed images -> (B, D) unit-norm fp32 image embeddings."""
    from common.device import autocast
    with autocast(bundle.device, amp_dtype):
        feats = bundle.model.encode_image(images.to(bundle.device))
    return F.normalize(feats.float(), dim=-1)


def load_rgb(path: str | os.PathLike):
    """A PIL RGB image; a clear error naming the file when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    from common.datasets import to_8_bit, upright
    try:
        with Image.open(path) as im:
            return to_8_bit(upright(im)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def encode_image_files(bundle: ClipBundle, paths: Sequence[Path], batch_size: int = 64,
                       amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, D) unit-norm embeddings of image files, in order."""
    out = []
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([bundle.preprocess(load_rgb(p)) for p in paths[i:i + batch_size]])
        out.append(encode_images(bundle, batch, amp_dtype))
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)
