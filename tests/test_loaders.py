"""Issue 20, data loading: the i-CLEVR and Fill50k data sets decode nothing at start-up (each item's images are
decoded when it is read), and the items are the bytes the up-front decoding gave; scripts/bench_loader.py runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError


@pytest.fixture(scope="module")
def iclevr_folder(tmp_path_factory):
    """Twelve renders; every other one stored as the lab stores its files (320x240 RGBA), which the loader
    converts and resizes."""
    from p1_ddpm.render_iclevr import main as render
    out = tmp_path_factory.mktemp("iclevr")
    render(["--out", str(out), "--n", "12", "--seed", "4", "--labels-from", "random"])
    for f in sorted((out / "images").glob("*.png"))[::2]:
        with Image.open(f) as im:
            big = im.convert("RGBA").resize((320, 240), Image.BICUBIC)
        big.save(f)
    return out


def test_iclevr_decodes_lazily_with_the_same_bytes(iclevr_folder, monkeypatch):
    import p1_ddpm.iclevr_data as iclevr_data
    from common.step_batches import BatchStream
    from p1_ddpm.iclevr_data import ICLEVRDataset, find_image_dir, load_image

    names = sorted(json.loads((iclevr_folder / "train.json").read_text()))
    image_dir = find_image_dir(iclevr_folder)
    # what the data set held before issue 20: every image decoded at construction
    eager = torch.from_numpy(np.stack([load_image(image_dir / n) for n in names])).permute(0, 3, 1, 2)

    calls = []
    monkeypatch.setattr(iclevr_data, "load_image", lambda path: calls.append(path) or load_image(path))
    ds = ICLEVRDataset(iclevr_folder, names)
    assert calls == []  # nothing decoded at start-up
    for i in range(len(ds)):
        img, cond = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert torch.equal(img, eager[i])
    assert len(calls) == len(ds)  # one decode per item read
    batch = BatchStream(ds, 4, seed=1).batch(0)
    idx = BatchStream(ds, 4, seed=1).indices(0)
    assert torch.equal(batch[0], eager[idx]) and torch.equal(batch[1], ds.cond[idx])
    # `images` (the judge's trainer) decodes them all once, the same bytes; items then come from it
    assert torch.equal(ds.images, eager)
    calls.clear()
    assert torch.equal(ds[3][0], eager[3]) and calls == []


def test_iclevr_missing_image_still_fails_at_start(iclevr_folder, tmp_path):
    import shutil

    from p1_ddpm.iclevr_data import ICLEVRDataset
    broken = tmp_path / "broken"
    shutil.copytree(iclevr_folder, broken)
    gone = sorted((broken / "images").glob("*.png"))[5]
    gone.unlink()
    with pytest.raises(UserError, match=gone.name):
        ICLEVRDataset(broken)


def test_fill50k_decodes_nothing_at_start(tmp_path, monkeypatch):
    import p3_controlnet.data as fill_data
    from p3_controlnet.make_fill50k import main as make_fill
    make_fill(["--out", str(tmp_path / "fill"), "--n", "12", "--size", "64", "--seed", "1"])
    real = fill_data.load_image
    calls = []
    monkeypatch.setattr(fill_data, "load_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    dm = fill_data.Fill50kDataModule(tmp_path / "fill", size=64, batch_size=2, val_count=2)
    assert calls == []
    item = dm.train_set[0]
    assert len(calls) == 2 and item["control"].shape == (3, 64, 64)  # its source and target, when read


def test_bench_loader_runs(capsys):
    from tests.conftest import shared_data
    shared_data()
    from scripts.bench_loader import main
    main(["--rounds", "1", "--workers", "0,1", "--digits", "100", "--iclevr", "70", "--fill", "12", "--batches", "2",
          "--no-write"])
    out = capsys.readouterr().out
    for name in ("digits", "iclevr", "fill50k"):
        assert f"| {name} |" in out
    assert "i-CLEVR start-up" in out


def test_num_workers_auto_per_device(monkeypatch):
    """--num-workers auto: the CUDA branch's arithmetic, run on the CPU with the accelerator answer patched."""
    import argparse

    import common.lightning_utils as lu
    p = argparse.ArgumentParser()
    lu.add_trainer_flags(p, "")
    args = p.parse_args([])
    assert args.num_workers == "auto"
    assert lu.resolve_num_workers(args) == 0 and args.num_workers == 0  # the CPU: in-process loading
    assert lu.resolve_num_workers(p.parse_args(["--num-workers", "3"])) == 3
    for flag, bad in (("--num-workers", "-1"), ("--devices", "0"), ("--devices", "abc"), ("--devices", "0,1")):
        with pytest.raises(SystemExit):  # argparse's one-line error, on every machine
            p.parse_args([flag, bad])

    monkeypatch.setattr(lu, "resolve_accelerator", lambda accelerator: "gpu")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(lu.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert lu.resolve_num_workers(p.parse_args(["--devices", "8"])) == 3       # 32 cores / 8 GPUs - 1
    assert lu.resolve_num_workers(p.parse_args(["--devices", "2"])) == 6       # capped
    assert lu.resolve_num_workers(p.parse_args(["--devices", "2"]), decodes=False) == 0  # data in memory
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert lu.resolve_num_workers(p.parse_args(["--devices", "1"])) == 2       # SLURM's share wins
