"""Shared fixtures: the real data folder beside the repo, a tiny course-layout digits tree, a tiny P1 checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".mplconfig"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not present at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def digits_npz() -> dict[str, dict[str, np.ndarray]]:
    """The first images of the real MNIST-M and SVHN arrays (enough for loaders and short training)."""
    root = shared_data() / "digits"
    out = {}
    for name, file in (("mnistm", "mnistm.npz"), ("svhn", "svhn_partial.npz"), ("usps", "usps.npz")):
        with np.load(root / file) as z:
            out[name] = {k: z[k][:300] for k in z.files}
    return out


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """A course-layout tree written by scripts/prepare_digits.py from the real npz files (60 images each)."""
    from scripts.prepare_digits import main as prepare
    out = tmp_path_factory.mktemp("digits")
    prepare(["--npz-dir", str(shared_data() / "digits"), "--out", str(out), "--limit", "60"])
    return out


def run_cli(main, argv, capsys) -> tuple[int, str]:
    """Call a CLI main(argv); return (exit code, captured stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def tiny_unet_config(**overrides) -> dict:
    cfg = dict(image_size=28, channels=(8, 16), num_res_blocks=1, attention_levels=(1,), dropout=0.0,
               condition="digits", num_domains=2, patch_size=2)
    cfg.update(overrides)
    return cfg


def save_random_p1_unet(path: Path, unet_config: dict, **config) -> Path:
    """A randomly initialised (seed 0) p1_ddpm UNet saved as train.py would; the zero-initialised output
    layers are filled with noise so that samples vary. `config` joins the checkpoint config beside 'model'."""
    from common.checkpoint import save_checkpoint
    from p1_ddpm.model import CHECKPOINT_KIND, ConditionalUNet
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    save_checkpoint(path, model.state_dict(), CHECKPOINT_KIND, {"model": model.config, **config})
    return path


@pytest.fixture(scope="session")
def tiny_p1_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny digits UNet saved as train.py would."""
    return save_random_p1_unet(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", tiny_unet_config(),
                               schedule="linear", num_train_steps=1000)
