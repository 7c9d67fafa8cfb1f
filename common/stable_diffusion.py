"""Stable Diffusion v1.x, loaded with no network access: shared by P3 (ControlNet) and P5 (textual inversion).

`load_sd(path)` takes either the original single-file checkpoint (`sd-v1-4.ckpt` or a `.safetensors`
with LDM key names: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`)
or a diffusers-format folder (`unet/`, `vae/`, `text_encoder/`, optional `tokenizer/`, `scheduler/`).
Nothing is fetched from a hub: the component configs ship in `common/sd_v1_configs/`, the CLIP
tokenizer is built from the BPE file bundled inside open_clip_torch, and every from_pretrained call is
local_files_only with HF_HUB_OFFLINE set (common/__init__.py).

A weights file that is truncated or holds NaN/infinity (a diverged fine-tune saved as SD or as a ControlNet
folder, which load_diffusers_model also reads) is refused in one line naming the file.

Single-file conversion uses diffusers' own LDM -> diffusers key converters; the component sizes that can
differ between checkpoints (widths, depths, channels, vocabulary) are read from the weights, the rest
(GroupNorm groups, UNet heads, latent scale) from the shipped SD v1 configs.

Sampling conventions (match the original LDM/ControlNet DDIM sampler): DDIM with steps_offset 1,
set_alpha_to_one False, "leading" spacing; classifier-free guidance eps_u + w (eps_c - eps_u); the
initial latent noise of sample i comes from a CPU generator seeded with seed + i, so an image does not
depend on the batch it is generated in.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import check_finite
from common.device import autocast
from common.errors import UserError, one_line
from common.seeding import pad_items, padded_size

CONFIG_DIR = Path(__file__).resolve().parent / "sd_v1_configs"
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
CLIP_BOS, CLIP_EOS = 49406, 49407


def shipped_config(name: str) -> dict:
    """One of the shipped SD v1.x configs: 'unet', 'vae', 'text_encoder' or 'scheduler'."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


# ----------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-character table (the 256 base symbols of its byte-level BPE), in id order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary the tokenizer is "
                        "built from (pip install -r requirements.txt)") from None
    bpe = Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise UserError(f"{bpe}: CLIP BPE vocabulary not found inside open_clip_torch (reinstall it)")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    # CLIP keeps the first 49152 - 256 - 2 merges (line 0 is a header), as open_clip's SimpleTokenizer does
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """SD v1's CLIP tokenizer (49408 tokens, bos 49406, eos = pad 49407), built from open_clip's bundled BPE."""
    from transformers import CLIPTokenizer
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------------- components

@dataclass
class SDComponents:
    vae: diffusers.AutoencoderKL  # noqa: F821
    unet: diffusers.UNet2DConditionModel  # noqa: F821
    text_encoder: transformers.CLIPTextModel  # noqa: F821
    tokenizer: transformers.CLIPTokenizer  # noqa: F821
    noise_scheduler: diffusers.DDPMScheduler  # noqa: F821
    source: str

    def to(self, device=None, dtype=None) -> SDComponents:
        with _without_diffusers_notes():
            for m in (self.vae, self.unet, self.text_encoder):
                m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> SDComponents:
        """eval mode and requires_grad False on the VAE, UNet and text encoder."""
        for m in (self.vae, self.unet, self.text_encoder):
            m.eval().requires_grad_(False)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's down-sampling of the latents
        (SD v1: 8 x 8 = 64; the mini SD and the tests' tiny UNet: 8 x 4 = 32)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def prediction(self) -> str:
        """What the UNet outputs, in common.schedules.PREDICTIONS' words ('eps' for SD v1; 'v' for SD 2.x-768),
        from the scheduler's prediction_type; the trainers' loss follows it. Anything else: UserError."""
        kind = self.noise_scheduler.config.prediction_type
        words = {"epsilon": "eps", "v_prediction": "v"}
        if kind not in words:
            raise UserError(f"{self.source}: the scheduler's prediction_type is {kind!r}; training supports "
                            f"{' and '.join(map(repr, words))} only")
        return words[kind]

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at: the UNet's latent sample_size times the VAE's factor
        (SD v1: 64 x 8 = 512; the mini SD: 8 x 8 = 64). Generation defaults to it."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def make_ddpm_scheduler(config: dict | None = None):
    """SD v1's training noise schedule (1000 steps, scaled_linear 0.00085..0.012, epsilon)."""
    from diffusers import DDPMScheduler
    base = shipped_config("scheduler")
    if config:
        # keep the checkpoint's schedule but never its sampler-only settings (PNDM's skip_prk_steps etc.)
        base.update({k: v for k, v in config.items() if k in base and not k.startswith("_")})
    base.pop("_class_name", None)
    return DDPMScheduler.from_config(base)


def check_sampling_steps(steps: int, sd: SDComponents) -> None:
    """DDIM takes at most the schedule's T steps (1000 for SD v1): more is a one-line UserError."""
    limit = sd.noise_scheduler.config.num_train_timesteps
    if not 1 <= steps <= limit:
        raise UserError(f"--steps must be in [1, {limit}] (the diffusion steps of {sd.source}), got {steps}")


def make_ddim_scheduler(noise_scheduler):
    """A DDIMScheduler on the same betas, set up like LDM's DDIM sampler (leading spacing, offset 1, eta 0)."""
    from diffusers import DDIMScheduler
    cfg = dict(noise_scheduler.config)
    cfg.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return DDIMScheduler.from_config(cfg)


def _bad_path(path: Path, what: str) -> UserError:
    return UserError(
        f"{path}: {what}. --sd takes Stable Diffusion v1.x as a single-file checkpoint "
        f"(sd-v1-4.ckpt or .safetensors with LDM key names) or a diffusers folder (unet/, vae/, text_encoder/)"
    )


def _unreadable(file: Path, e: Exception) -> UserError:
    return UserError(f"{file}: not a readable safetensors file, truncated or corrupt? ({one_line(e)})")


@contextlib.contextmanager
def _without_diffusers_notes():
    """diffusers' ModelMixin.to() notes which modules "should be kept in float32" (none, for SD v1) and advises
    from_pretrained(torch_dtype=...) on every call: a line per model on every run, saying nothing to act on."""
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) when it differs, without diffusers' notes (`_without_diffusers_notes`)."""
    if module.dtype == dtype:
        return module
    with _without_diffusers_notes():
        return module.to(dtype=dtype)


def quiet_libraries() -> None:
    """--quiet reaches diffusers and transformers too: no "Loading weights" bars, no notes below errors."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()


def load_sd(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load SD v1.x from a single-file LDM checkpoint or a diffusers folder, with no network access.

    The returned modules are in eval mode, on `device`; the UNet and the VAE in `dtype`, the text encoder in
    fp32 whatever `dtype` (it runs once per prompt, and weights rounded to bf16 would shift every prompt
    embedding; a later `.to(float32)` cannot undo the rounding). Gradients are left on (callers freeze what
    they do not train, e.g. with `.freeze()`). Bad path or file -> UserError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise _bad_path(path, "not found")
    if path.is_dir():
        comps = _load_diffusers_folder(path)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        comps = _load_single_file(path)
    else:
        raise _bad_path(path, f"unrecognised file type {path.suffix!r} (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
    for m in (comps.vae, comps.unet):
        cast(m, dtype)
    cast(comps.text_encoder, torch.float32)  # also when the file stores it in fp16 (the shipped mini SD)
    for m in (comps.vae, comps.unet, comps.text_encoder):
        m.to(device).eval()
    return comps


def _load_diffusers_folder(path: Path) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    missing = [sub for sub in ("unet", "vae", "text_encoder") if not (path / sub / "config.json").is_file()]
    if missing:
        raise _bad_path(
            path, "not a diffusers Stable Diffusion folder (no " + ", ".join(f"{m}/config.json" for m in missing) + ")"
        )
    from safetensors import SafetensorError
    try:
        unet = load_diffusers_model(UNet2DConditionModel, path / "unet")
        vae = load_diffusers_model(AutoencoderKL, path / "vae")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise _bad_path(path, f"could not load its weights ({one_line(e)})") from None
    _check_text_to_image(unet.config, vae.config, path)
    files = sorted((path / "text_encoder").glob("*.safetensors"))
    text_file = files[0] if len(files) == 1 else path / "text_encoder"  # what a message about its weights names
    try:
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except SafetensorError as e:  # a truncated or corrupt text_encoder/*.safetensors: name the file
        raise _unreadable(text_file, e) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise _bad_path(path, f"could not load its weights ({one_line(e)})") from None
    check_finite(text_encoder.state_dict(), text_file)
    if (path / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    else:
        tokenizer = build_clip_tokenizer(text_encoder.config.max_position_embeddings)
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.is_file() else None
    return SDComponents(vae, unet, text_encoder, tokenizer, make_ddpm_scheduler(sched_cfg), str(path))


def load_diffusers_model(cls, folder: Path, bad_path=None, fits: str = "SD v1"):
    """A diffusers model folder: one weights file is adopted on the meta device (no random init, no
    `accelerate` needed); anything else (sharded, .bin only) goes through from_pretrained, offline.
    bad_path(path, what) -> UserError words a file that does not fit `fits` (default: one naming --sd)."""
    weights = [folder / f"diffusion_pytorch_model{v}.safetensors" for v in ("", ".fp16")]
    found = next((w for w in weights if w.is_file()), None)
    if found is None:
        model = cls.from_pretrained(folder, local_files_only=True)
        check_finite(model.state_dict(), folder)
        return model
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config = {k: v for k, v in cls.load_config(folder).items() if not k.startswith("_")}
    try:
        state_dict = load_file(str(found))
    except (SafetensorError, OSError) as e:  # truncated (interrupted download) or corrupt: one line naming it
        raise _unreadable(found, e) from None
    return _build_on_meta(cls, config, state_dict, found, folder.name, bad_path or _bad_path, fits)


# ------------------------------------------------------------------------------------ single-file checkpoints

class _PickleStub:
    """Stands in for a non-tensor class in a pickled checkpoint (e.g. a Lightning callback) so the file can be
    read with torch's weights-only unpickler, which never runs code from the file."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap


def _torch_load_weights_only(path: Path) -> dict:
    import pickle
    try:
        return _torch_load(path)
    except pickle.UnpicklingError:
        # classes the weights-only unpickler refuses (Lightning callbacks in sd-v1-4.ckpt-style files):
        # replace each with an inert stub instead of unpickling the file with arbitrary-code execution
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if not unsafe:
            raise
        stubs = [(type(name.rsplit(".", 1)[-1], (_PickleStub,), {}), name) for name in unsafe]
        with torch.serialization.safe_globals(stubs):
            return _torch_load(path)


NATIVE_RESOLUTION_KEY = "native_resolution"


def read_sd_checkpoint(path: Path, info: dict | None = None) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a single-file checkpoint (.safetensors, or a torch pickle with 'state_dict').

    `info`, if given, receives the file's native resolution under NATIVE_RESOLUTION_KEY when the file records
    one (the project's exports do, in the safetensors metadata or as a top-level entry of a .ckpt): the UNet's
    weights do not say what image size it was trained at."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            sd = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        else:
            sd = _torch_load_weights_only(path)
            meta = sd if isinstance(sd, dict) else {}
    except Exception as e:  # any reader failure means a bad file; report it as one line
        raise _bad_path(
            path,
            f"not a readable checkpoint ({one_line(e)})",
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise _bad_path(path, "holds no state dict")
    if info is not None and NATIVE_RESOLUTION_KEY in meta:
        try:
            info[NATIVE_RESOLUTION_KEY] = int(meta[NATIVE_RESOLUTION_KEY])
        except (TypeError, ValueError):
            raise _bad_path(path, f"{NATIVE_RESOLUTION_KEY} {meta[NATIVE_RESOLUTION_KEY]!r} is not a number") from None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: dict[str, torch.Tensor]) -> dict:
    """SD v1 UNet config with the sizes read from LDM-keyed weights (prefix already removed)."""
    cfg = shipped_config("unet")
    cfg.pop("_class_name", None)
    inputs = _indices(sd, r"input_blocks\.(\d+)\.")
    ops = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight")
    per_level = ops[0] if ops else len(inputs)  # conv_in, L res blocks, then the first down-sampler
    layers = per_level - 1
    levels = len(ops) + 1
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * per_level
        channels.append(int(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        attention.append(any(k.startswith(f"input_blocks.{first}.1.") for k in sd))
    proj_in = next(v for k, v in sd.items() if k.endswith("proj_in.weight")) if any(attention) else None
    cross = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    cfg.update(
        in_channels=int(sd["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(sd["out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
    )
    if cross is not None:
        cfg["cross_attention_dim"] = int(cross.shape[1])
    if proj_in is not None:
        cfg["use_linear_projection"] = proj_in.dim() == 2
    return cfg


def infer_vae_config(sd: dict[str, torch.Tensor]) -> dict:
    cfg = shipped_config("vae")
    cfg.pop("_class_name", None)
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    blocks = _indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    cfg.update(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        latent_channels=int(sd["post_quant_conv.weight"].shape[0]),
        block_out_channels=[int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels],
        layers_per_block=len(blocks),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )
    return cfg


def infer_text_config(sd: dict[str, torch.Tensor]) -> dict:
    cfg = shipped_config("text_encoder")
    emb = sd["text_model.embeddings.token_embedding.weight"]
    hidden = int(emb.shape[1])
    cfg.update(
        vocab_size=int(emb.shape[0]),
        hidden_size=hidden,
        max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        num_hidden_layers=len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        # heads are not in the weights; CLIP ViT-L/14 (SD v1) uses 64-wide heads: 768 -> 12
        num_attention_heads=max(1, hidden // 64),
        projection_dim=hidden,
    )
    return cfg


def _check_text_to_image(unet_config, vae_config, path: Path) -> None:
    """A UNet that takes or gives other than the VAE's latent channels is no text-to-image SD v1: the
    inpainting model takes 9 (latents, mask, masked image), and it would load and then fail in the sampler."""
    latent = vae_config["latent_channels"]
    takes, gives = unet_config["in_channels"], unet_config["out_channels"]
    if takes != latent or gives != latent:
        raise UserError(f"{path}: its UNet takes {takes} channels and gives {gives}, but the VAE's latents have "
                        f"{latent}: an inpainting model? text-to-image SD v1.x needed")


def _build_on_meta(cls, config: dict, state_dict: dict[str, torch.Tensor], path: Path, what: str,
                   bad_path=_bad_path, fits: str = "SD v1"):
    """Instantiate without allocating or initialising weights, then adopt the checkpoint's tensors (all finite:
    a NaN from a diverged fine-tune would otherwise give black images without a word). A file that does not
    fit `fits` (what the model should be) is bad_path(path, what)'s UserError (by default one that says what
    --sd takes)."""
    check_finite(state_dict, path)
    try:
        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except (ValueError, TypeError, RuntimeError) as e:
        # sizes read from the weights that SD v1's fixed settings (32 GroupNorm groups, 8 heads) cannot build:
        # diffusers' own error would be a traceback
        raise bad_path(path, f"its {what} cannot be built as {fits} from the sizes in the file ({one_line(e)})") \
            from None
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        # the renaming that diffusers' own from_pretrained applies to a one-file (unsharded) weights file:
        # older SD v1 folders name the VAE's mid-block attention query/key/value/proj_attn, today's
        # to_q/to_k/to_v/to_out.0. Calling diffusers' method (not a table of our own) converts whatever
        # legacy names it knows. It renames in place and leaves current names alone, so converted LDM
        # weights pass through unchanged.
        state_dict = dict(state_dict)
        fix_keys(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise bad_path(path, f"its {what} weights do not fit {fits}: {len(missing)} missing (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    bad = [k for k in own if own[k].shape != state_dict[k].shape]
    if bad:
        raise bad_path(path, f"{what} shape mismatch for {bad[0]}: file {tuple(state_dict[bad[0]].shape)}, "
                              f"model {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left uninitialised after loading: {left[:3]}")
    return model


def _load_single_file(path: Path) -> SDComponents:
    from transformers import CLIPTextConfig, CLIPTextModel
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint,
            convert_ldm_unet_checkpoint,
            convert_ldm_vae_checkpoint,
        )
    except ImportError as e:  # the converters are diffusers internals: name the version that has them
        raise UserError(f"this diffusers has no LDM single-file converters ({e}); install the pinned diffusers "
                        f"from requirements.txt, or pass a diffusers-format folder to --sd") from None
    info = {}
    sd = read_sd_checkpoint(path, info)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    text_keys = [k for k in sd if k.startswith(TEXT_PREFIX)]
    missing = [
        name
        for name, part in (
            ("UNet (model.diffusion_model.*)", unet_sd),
            ("VAE (first_stage_model.*)", vae_sd),
            ("CLIP text encoder (cond_stage_model.transformer.*)", text_keys),
        )
        if not part
    ]
    if missing:
        hint = " (is this a diffusers-format single component, an SD 2.x / SDXL file, or a LoRA?)"
        raise _bad_path(path, "not an SD v1.x LDM checkpoint: no " + ", no ".join(missing) + " weights" + hint)
    try:
        unet_cfg = infer_unet_config(unet_sd)
        vae_cfg = infer_vae_config(vae_sd)
    except (KeyError, IndexError, StopIteration) as e:
        raise _bad_path(path, f"unexpected LDM layout (no {e})") from None
    _check_text_to_image(unet_cfg, vae_cfg, path)
    if NATIVE_RESOLUTION_KEY in info:  # else SD v1's 64 latents (512 px)
        unet_cfg["sample_size"] = info[NATIVE_RESOLUTION_KEY] // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        vae_cfg["sample_size"] = info[NATIVE_RESOLUTION_KEY]
    unet_dif = convert_ldm_unet_checkpoint(sd, unet_cfg)
    vae_dif = convert_ldm_vae_checkpoint(sd, vae_cfg)
    text_sd = convert_ldm_clip_checkpoint({k: sd[k] for k in text_keys})
    # SD v1 files name CLIP weights `text_model.*` (transformers 4.x); position_ids is a buffer today
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_sd.items()
               if not k.endswith("position_ids")}
    try:
        text_cfg = CLIPTextConfig(**infer_text_config(text_sd))
    except KeyError as e:
        raise _bad_path(path, f"unexpected CLIP text encoder layout (no {e})") from None
    del sd
    unet = _build_on_meta(UNet2DConditionModel, unet_cfg, unet_dif, path, "UNet")
    vae = _build_on_meta(AutoencoderKL, vae_cfg, vae_dif, path, "VAE")
    text_encoder = CLIPTextModel(text_cfg)  # small; built normally so its non-persistent buffers are real
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        # transformers 5 dropped the `text_model.` level from CLIPTextModel's own parameter names
        text_sd = {k[len("text_model."):]: v for k, v in text_sd.items()}
    from common.checkpoint import load_into
    load_into(text_encoder, text_sd, path)
    tokenizer = build_clip_tokenizer(text_cfg.max_position_embeddings)
    return SDComponents(vae, unet, text_encoder, tokenizer, make_ddpm_scheduler(), str(path))


# ------------------------------------------------------------------------------------------- text and latents

def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77) token ids, padded with eos and truncated to the tokenizer's length, as SD v1 does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device=None) -> torch.Tensor:
    """(B, 77, D) CLIP last hidden states: SD's cross-attention context. Gradients follow the caller's mode."""
    device = device if device is not None else text_encoder.device
    ids = tokenize(tokenizer, prompts).to(device)
    return text_encoder(ids)[0]


def encode_images(
    vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Images in [-1, 1] (B,3,H,W) -> scaled latents (a posterior sample, or its mean with sample=False)."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float32). The batch is padded (on the CPU) so that an image decodes
    to the same bits whatever batch it is in (common.seeding.BATCH_QUANTUM)."""
    n = len(latents)
    latents = pad_items(latents, padded_size(n, 1, latents.device))
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample[:n].float().clamp(-1, 1)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int], device, dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) N(0,1) latents, sample i drawn on the CPU from its own generator seeded with seeds[i]."""
    out = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


# unet_kwargs_fn(latent_model_input, t, context) -> extra UNet kwargs (e.g. ControlNet residuals)
UNetKwargsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict]


@torch.no_grad()
def sample_latents(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                   steps: int = 50, guidance: float = 7.5, eta: float = 0.0,
                   unet_kwargs_fn: UNetKwargsFn | None = None, progress: bool = False,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Classifier-free-guided denoising of `latents` with a DDIM-style diffusers scheduler.

    cond / uncond: (B, 77, D) contexts (uncond None or guidance 1 -> no guidance, one UNet pass a step).
    The conditional and unconditional halves run as one batch of 2B. eta > 0 is not supported here
    (its per-step noise would depend on the batch); the course samples with eta 0. The UNet (and
    unet_kwargs_fn) run under autocast to `amp_dtype` on the latents' device (None: exact fp32).
    """
    from tqdm.auto import tqdm
    if eta != 0:
        raise ValueError("sample_latents supports eta = 0 only (batch-size independent sampling)")
    scheduler.set_timesteps(steps, device=latents.device)
    guided = uncond is not None and guidance != 1.0
    # padded with copies of the last item (dropped at the end) so that every UNet forward has a batch whose CPU
    # kernels give each image the same bits in any batch (common.seeding.BATCH_QUANTUM)
    n = len(latents)
    size = padded_size(n, 2 if guided else 1, latents.device)
    if size != n:
        if unet_kwargs_fn is not None:
            raise ValueError(f"sample_latents: pad the batch to {size} (common.seeding.padded_size) before passing "
                             f"unet_kwargs_fn, whose per-item inputs it cannot pad")
        latents, cond = pad_items(latents, size), pad_items(cond, size)
        uncond = pad_items(uncond, size) if guided else uncond
    context = torch.cat([uncond, cond]) if guided else cond
    x = latents
    for t in tqdm(scheduler.timesteps, desc="DDIM", disable=not progress, leave=False):
        model_in = torch.cat([x, x]) if guided else x
        model_in = scheduler.scale_model_input(model_in, t)
        with autocast(latents.device, amp_dtype):
            extra = unet_kwargs_fn(model_in, t, context) if unet_kwargs_fn else {}
            eps = unet(model_in, t, encoder_hidden_states=context, **extra).sample.float()
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x[:n]
