"""Tiny randomly initialised Stable Diffusion v1 files for CPU tests, in every format `load_sd` reads.

The components, the tiny configs and the writers live in `common/sd_export.py` (the project and its
benchmarks use them too); this adds what only the tests want: an `.ckpt` that, like sd-v1-4.ckpt,
pickles a non-tensor object which the weights-only unpickler refuses.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.sd_export import (  # noqa: F401  (re-exported for the tests)
    TINY_IMAGE,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    components_to_ldm,
    tiny_sd_components,
    write_diffusers_folder,
    write_ldm_checkpoint,
)


class LightningCallbackLike:
    """A class the weights-only unpickler refuses, as sd-v1-4.ckpt's pickled Lightning callbacks are."""

    def __init__(self, monitor: str = "val/loss"):
        self.monitor = monitor


def write_tiny_sd(dir: str | os.PathLike, fmt: str = "diffusers", seed: int = 0, comps=None) -> Path:
    """Write tiny SD weights; returns the path to give load_sd / --sd.

    fmt: 'diffusers' (folder with unet/ vae/ text_encoder/ scheduler/), 'ldm' (sd.ckpt, a torch pickle
    with 'state_dict', 'global_step' and a pickled non-tensor object like the original), or
    'ldm-safetensors' (sd.safetensors).
    """
    comps = comps or tiny_sd_components(seed)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        return write_diffusers_folder(comps, dir)
    if fmt == "ldm":
        return write_ldm_checkpoint(comps, dir / "sd.ckpt",
                                    extra={"global_step": 470000, "callbacks": {"cb": LightningCallbackLike()}})
    if fmt == "ldm-safetensors":
        return write_ldm_checkpoint(comps, dir / "sd.safetensors")
    raise ValueError(f"unknown fmt {fmt!r}")
