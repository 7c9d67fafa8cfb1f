"""Shared fixtures: the real data folder beside the repo, a tiny course-layout digits tree, a tiny P1 checkpoint."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".mplconfig"))
torch.set_num_threads(min(2, torch.get_num_threads()))


SHARED_MISSING = "real data not present at"
# make test-fast leaves these out (-m "not slow"): DDP and torch.compile runs, the demos, the hw2_*.sh
# scripts run end to end and the trainers killed (kill -9) and resumed, each of which starts Python processes
# or compiles
SLOW_TEST_NAMES = re.compile(r"_ddp_|compile|demo|hw2_|end_to_end|after_kill")


def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED_MISSING} {SHARED}")
    return SHARED


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_TEST_NAMES.search(item.name):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how many tests did not run because ../shared/data is missing, so a green run is not mistaken
    for one that read the real data."""
    skipped = terminalreporter.stats.get("skipped", [])
    missing = [r for r in skipped if SHARED_MISSING in str(getattr(r, "longrepr", ""))]
    if missing:
        terminalreporter.write_line(
            f"{len(missing)} test(s) skipped because the real data is missing: {SHARED} not found "
            f"(see ../shared/data/README.md)", yellow=True)


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


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python: this one's, with the repository first on PYTHONPATH. Prepended, not
    replacing it, so that a suite run under another PYTHONPATH (other package versions) runs its children
    under it too."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""), **extra)


def convs_are_channels_last(module: torch.nn.Module) -> bool:
    """Every multi-channel convolution weight of `module` is in channels_last (NHWC) memory; there is one."""
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1]
    return bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def plant_nan(weights: Path, prefix: str = "") -> str:
    """Set one element of a safetensors file's first multi-element float tensor (by sorted name, among those
    starting with `prefix`) to NaN, as a diverged run would leave it; return that tensor's name."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(weights))
    name = next(k for k, v in sorted(state.items())
                if k.startswith(prefix) and v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[1] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    return name


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


@pytest.fixture
def one_thread():
    """Tiny models on a shared machine run fastest on one thread (a killed-and-resumed subprocess uses the same;
    the batch padding was measured with one and two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
