"""P1 end to end with a tiny random model: layouts, hw2_1.sh, determinism, training + resume, bad inputs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.schedules import alphas_cumprod, make_betas
from p1_ddpm.infer import main as infer_main
from p1_ddpm.infer import plan
from p1_ddpm.model import ConditionalUNet, load_unet
from p1_ddpm.samplers import sample_conditional_images
from tests.conftest import REPO, convs_are_channels_last, run_cli, tiny_unet_config

FAST = ["--steps", "2", "--quiet"]


def test_unet_shapes_both_conditions():
    m = ConditionalUNet(**tiny_unet_config())
    x = torch.randn(3, 3, 28, 28)
    assert m(x, torch.tensor([0, 500, 999]), torch.tensor([[1, 0], [10, 1], [3, 2]])).shape == x.shape
    mh = ConditionalUNet(**tiny_unet_config(condition="multihot", num_labels=24, image_size=64, patch_size=1))
    x = torch.randn(2, 3, 64, 64)
    cond = torch.zeros(2, 24)
    cond[0, [1, 5]] = 1
    assert mh(x, torch.tensor([1, 2]), cond).shape == x.shape


def test_sample_conditional_images_deterministic_and_batch_invariant(tiny_p1_checkpoint):
    model, cfg = load_unet(tiny_p1_checkpoint)
    ab = alphas_cumprod(make_betas("linear"))
    cond = torch.tensor([[d % 10, d % 2] for d in range(6)])
    # DDPM walks every step of the schedule it is given: a 40-step linear schedule (same code, 25x fewer steps)
    ab_40 = alphas_cumprod(make_betas("linear", num_steps=40))
    for sampler, kw in (("dpmpp2m", {}), ("ddim", {"eta": 0.5}), ("ddpm", {})):
        if sampler == "ddpm":
            c, idx = cond[:2], [0, 1]
            kw = {"alphas_cumprod": ab_40}
        else:
            c, idx = cond, range(6)
            kw = {"alphas_cumprod": ab, **kw}
        a = sample_conditional_images(model, c, idx, seed=3, sampler=sampler, steps=4, batch_size=6, **kw)
        b = sample_conditional_images(model, c, idx, seed=3, sampler=sampler, steps=4, batch_size=6, **kw)
        assert torch.equal(a, b), sampler
        small = sample_conditional_images(model, c, idx, seed=3, sampler=sampler, steps=4, batch_size=1, **kw)
        # fp32 convolutions may round differently per batch size; the noise itself is identical
        assert torch.allclose(a, small, atol=1e-4), sampler
        other = sample_conditional_images(model, c, idx, seed=4, sampler=sampler, steps=4, batch_size=6, **kw)
        assert not torch.allclose(a, other), sampler


def _check_folder(folder: Path, digits, count: int):
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{d}_{i:03d}.png" for d in digits for i in range(1, count + 1))
    with Image.open(folder / names[0]) as im:
        assert im.mode == "RGB" and im.size == (28, 28)


def test_infer_year_defaults_to_the_latest_as_report_does():
    """infer.py --year (once --layout, still accepted) and report.py --year: one name, one default, the year of
    the top-level hw2_1.sh."""
    from p1_ddpm import report
    from p1_ddpm.infer import build_parser
    parse = build_parser().parse_args
    assert parse(["--out", "x"]).year == report.build_parser().parse_args(["--out", "x"]).year == "2025"
    assert parse(["--layout", "2023", "--out", "x"]).year == "2023"


@pytest.mark.parametrize("layout", ["2023", "2024", "2025"])
def test_infer_layouts(layout, tiny_p1_checkpoint, tmp_path):
    out = tmp_path / "out"
    infer_main(["--year", layout, "--out", str(out), "--checkpoint", str(tiny_p1_checkpoint)] + FAST)
    if layout == "2023":
        _check_folder(out, range(10), 100)
    elif layout == "2024":
        assert sorted(os.listdir(out)) == ["mnistm", "svhn"]
        _check_folder(out / "mnistm", range(10), 50)
        _check_folder(out / "svhn", range(10), 50)
    else:
        _check_folder(out / "mnistm", range(0, 10, 2), 50)
        _check_folder(out / "svhn", range(1, 10, 2), 50)


def test_rerun_into_the_same_folder_holds_only_this_layouts_images(tiny_p1_checkpoint, tmp_path, capsys):
    """A 2025 run into a folder a 2024 run had filled once left the odd digits in mnistm/ and the even ones in
    svhn/ (500 images per folder, all graded); a 2023 run after it left both folders. Files this command does
    not write are kept, and named."""
    out = tmp_path / "out"
    run = lambda layout: infer_main(["--year", layout, "--out", str(out), "--checkpoint", str(tiny_p1_checkpoint),
                                     "--quiet"] + FAST)
    run("2024")
    (out / "mnistm" / "notes.txt").write_text("mine")
    run("2025")
    assert "note: " in capsys.readouterr().out and (out / "mnistm" / "notes.txt").read_text() == "mine"
    (out / "mnistm" / "notes.txt").unlink()
    _check_folder(out / "mnistm", range(0, 10, 2), 50)
    _check_folder(out / "svhn", range(1, 10, 2), 50)
    run("2023")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    _check_folder(out, range(10), 100)
    run("2024")
    assert sorted(os.listdir(out)) == ["mnistm", "svhn"]


def test_same_image_across_layouts_and_batch_sizes(tiny_p1_checkpoint, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    infer_main(["--year", "2024", "--out", str(a), "--checkpoint", str(tiny_p1_checkpoint), "--seed", "9"] + FAST)
    infer_main(["--year", "2023", "--out", str(b), "--checkpoint", str(tiny_p1_checkpoint), "--seed", "9",
                "--batch-size", "77"] + FAST)
    x = np.asarray(Image.open(a / "mnistm" / "7_031.png"), dtype=int)
    y = np.asarray(Image.open(b / "7_031.png"), dtype=int)
    assert np.abs(x - y).max() <= 1  # fp32 batch-size effects may move a pixel by one level at most
    c = tmp_path / "c"
    infer_main(["--year", "2024", "--out", str(c), "--checkpoint", str(tiny_p1_checkpoint), "--seed", "9"] + FAST)
    assert (a / "svhn" / "3_050.png").read_bytes() == (c / "svhn" / "3_050.png").read_bytes()


def test_plan_conditions():
    names, cond, idx = plan("2025")
    assert len(names) == len(set(idx)) == 500
    assert names[0] == os.path.join("mnistm", "0_001.png") and cond[0].tolist() == [0, 0]
    assert names[-1] == os.path.join("svhn", "9_050.png") and cond[-1].tolist() == [9, 1]


def test_report_reverse_process_follows_the_year(tiny_p1_checkpoint, tmp_path, monkeypatch):
    from common.images import make_grid, to_uint8
    from common.seeding import PerSampleNoise
    from p1_ddpm import report
    from p1_ddpm.infer import layout_jobs, sample_index

    labels = {year: [report.row_label(k, d) for k, d in report.reverse_rows(year)] for year in report.YEARS}
    assert labels == {"2023": ["MNIST-M 0"], "2024": ["MNIST-M 0", "SVHN 0"], "2025": ["MNIST-M 0", "SVHN 1"]}
    for year in report.YEARS:  # each row's digit is drawn from a data set that year's hw2_1.sh puts it in
        assert all((k, d) in {(kk, dd) for _, kk, dd, _ in layout_jobs(year)} for k, d in report.reverse_rows(year))

    # Record what main() draws, so that the figure can be rebuilt from it. The 1000-step chain is sampled for
    # real for the default year only; the other years' rows and labels are checked on stand-in frames.
    drawn = {}
    real = report.reverse_process

    def spy(model, ab, rows, seed, *args, **kwargs):
        if year == "2025":
            drawn[year] = real(model, ab, rows, seed, *args, **kwargs)
        else:
            g = torch.Generator().manual_seed(len(drawn))
            drawn[year] = torch.rand(len(rows), len(report.REVERSE_TIMESTEPS), 3, 28, 28, generator=g) * 2 - 1
        return drawn[year]

    monkeypatch.setattr(report, "reverse_process", spy)
    for year in report.YEARS:
        out = tmp_path / year
        argv = ["--out", str(out), "--checkpoint", str(tiny_p1_checkpoint), "--steps", "1", "--scale", "1",
                "--seed", "5", "--device", "cpu"]
        report.main(argv + (["--year", year] if year != "2025" else []))  # 2025 is the default
        rows = report.reverse_rows(year)
        assert drawn[year].shape == (len(rows), len(report.REVERSE_TIMESTEPS), 3, 28, 28)
        expected = make_grid(to_uint8(drawn[year].flatten(0, 1)), len(rows), len(report.REVERSE_TIMESTEPS),
                             row_labels=labels[year], col_labels=[f"t={t}" for t in report.REVERSE_TIMESTEPS])
        with Image.open(out / "reverse_process.png") as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected)), year
        assert (out / "grid_mnistm.png").is_file() and (out / "grid_svhn.png").is_file()
    # the chain starts from the noise hw2_1.sh gives image 001 of that data set and digit, and moves away from it
    rows = report.reverse_rows("2025")
    noise = PerSampleNoise(5, [sample_index(k, d, 1) for k, d in rows]).randn(3, 28, 28)
    assert torch.equal(drawn["2025"][:, 0], noise)
    assert not torch.allclose(drawn["2025"][:, -1], noise)


def test_hw2_1_sh_end_to_end(tiny_p1_checkpoint, tmp_path):
    """The 2024 hand-in script with extra flags (tests/test_handin.py runs every year's as the course does)."""
    script = str(REPO / "handin" / "2024" / "hw2_1.sh")
    out = tmp_path / "hw"
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", script, str(out), "--checkpoint", str(tiny_p1_checkpoint)] + FAST,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    _check_folder(out / "mnistm", range(10), 50)
    _check_folder(out / "svhn", range(10), 50)
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "usage" in r.stderr


def test_infer_bad_inputs(tiny_p1_checkpoint, tmp_path, capsys):
    from common.checkpoint import save_checkpoint
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, torch.nn.Linear(2, 2).state_dict(), "something.Else", {})
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(tiny_p1_checkpoint.read_bytes()[:1000])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--checkpoint", str(other), "--out", str(tmp_path / "o1")], "other.safetensors"),
        (["--checkpoint", str(trunc), "--out", str(tmp_path / "o2")], "trunc.safetensors"),
        (["--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o3")], "missing.safetensors"),
        (["--checkpoint", str(tiny_p1_checkpoint), "--out", str(blocker / "sub")], "is a file"),
    ]
    for argv, needle in cases:
        code, err = run_cli(infer_main, argv + FAST, capsys)
        assert code not in (0, None), argv
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "file",
        "other.json",
        "other.safetensors",
        "trunc.safetensors",
    ]


def test_wrong_architecture_checkpoint(tmp_path):
    from common.checkpoint import save_checkpoint
    from p1_ddpm.model import CHECKPOINT_KIND
    m = ConditionalUNet(**tiny_unet_config())
    bad_cfg = {"model": dict(m.config, channels=[8, 24]), "schedule": "linear", "num_train_steps": 1000}
    save_checkpoint(tmp_path / "w.safetensors", m.state_dict(), CHECKPOINT_KIND, bad_cfg)
    with pytest.raises(UserError, match="w.safetensors"):
        load_unet(tmp_path / "w.safetensors")


def test_checkpoint_prediction_field(tmp_path):
    """Files written before the 'prediction' field load as eps networks; an unknown value is a clear error."""
    from common.checkpoint import save_checkpoint
    from p1_ddpm.model import CHECKPOINT_KIND
    m = ConditionalUNet(**tiny_unet_config())
    old = {k: v for k, v in m.config.items() if k != "prediction"}
    save_checkpoint(tmp_path / "old.safetensors", m.state_dict(), CHECKPOINT_KIND, {"model": old, "schedule": "linear"})
    assert load_unet(tmp_path / "old.safetensors")[0].config["prediction"] == "eps"
    bad = {"model": dict(m.config, prediction="x0"), "schedule": "linear"}
    save_checkpoint(tmp_path / "bad.safetensors", m.state_dict(), CHECKPOINT_KIND, bad)
    with pytest.raises(UserError, match="bad.safetensors.*prediction"):
        load_unet(tmp_path / "bad.safetensors")


def _train(args, capsys=None):
    from p1_ddpm.train import main as train_main
    return train_main(args)


def test_train_runs_stops_and_resumes(digits_tree, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--batch-size", "8", "--channels", "8,16",
            "--val-every", "2", "--warmup-steps", "1", "--seed", "1"]
    _train(base + ["--max-steps", "2"])
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 2
    first = load_unet(out / "model.safetensors")[0].state_dict()
    assert (out / "samples" / "step_000002.png").is_file()
    _train(base + ["--max-steps", "4", "--resume"])
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 4
    assert ck["state_dict"]["ema.num_updates"].item() == 4  # the EMA resumed too, not restarted
    second = load_unet(out / "model.safetensors")[0].state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert (out / "best.safetensors").is_file() and (out / "samples" / "step_000004.png").is_file()
    # resumed with another save interval: Lightning keys the checkpoint callback's state by the interval, so
    # without a fixed name it would write last-v1.ckpt and a later --resume would read step 4
    every3 = [("3" if prev == "--val-every" else a) for prev, a in zip([None] + base, base)]
    _train(every3 + ["--max-steps", "6", "--resume"])
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 6 and not list(out.glob("last-v*.ckpt"))
    capsys.readouterr()
    _train(every3 + ["--max-steps", "6", "--resume"])  # a finished run: said, not silently nothing
    assert "already at its last step (6 of 6)" in capsys.readouterr().err


def test_resume_keeps_the_checkpoints_settings(digits_tree, tmp_path, capsys):
    """--resume goes on with the run's own settings: a flag left off takes the checkpoint's value (the export
    records what trained, not today's default) and a flag given with another value is refused in one line,
    before anything is written. Once, a new --lr was recorded but not used and --datasets changed silently."""
    import json

    from p1_ddpm.train import main as train_main
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--channels", "8,16", "--val-every", "2",
            "--warmup-steps", "1"]
    _train(base + ["--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--datasets", "mnistm"])
    before = (out / "last.ckpt").read_bytes()
    for flags, said in ((["--lr", "0.01"], "--lr 0.001 (not 0.01)"), (["--batch-size", "16"], "--batch-size 8"),
                        (["--datasets", "mnistm,svhn"], "--datasets mnistm (not mnistm,svhn)"),
                        (["--channels", "16,32"], "--channels 8,16")):
        code, err = run_cli(train_main, base + ["--max-steps", "4", "--resume"] + flags, capsys)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert (out / "last.ckpt").read_bytes() == before
    _train(base + ["--max-steps", "3", "--val-every", "3", "--resume"])  # --lr, --batch-size, --datasets left off
    saved = json.loads((out / "model.json").read_text())
    train = saved["config"]["train"]
    assert train["lr"] == 1e-3 and train["batch_size"] == 8 and train["datasets"] == "mnistm"
    assert train["max_steps"] == 3 and saved["metrics"]["global_step"] == 3


def test_resume_refuses_another_trainers_or_tasks_checkpoint(digits_tree, tmp_path, capsys):
    """A P4 checkpoint once gave KeyError: 'prediction', an i-CLEVR one a shape error inside Lightning."""
    import dataclasses

    from p1_ddpm.train import main as train_main
    from p4_dann.train import P4TrainConfig
    for hparams, said in (({"model_config": {"widths": [4]}, "train": dataclasses.asdict(P4TrainConfig()),
                            "mode": "dann"}, "not a checkpoint of p1_ddpm/train.py"),
                          ({"model_config": {"condition": "multihot"}, "train": {}},
                           "not a checkpoint of p1_ddpm/train.py --task digits")):
        ckpt = tmp_path / "other.ckpt"
        torch.save({"state_dict": {}, "global_step": 2, "hyper_parameters": hparams}, ckpt)
        out = tmp_path / "o"
        code, err = run_cli(train_main, ["--data", str(digits_tree), "--out", str(out), "--resume", str(ckpt)], capsys)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_lr_factor_warmup_and_cooldown():
    from common.lightning_utils import lr_factor
    assert [lr_factor(s, 4) for s in (0, 3, 100)] == [0.25, 1.0, 1.0]
    assert [lr_factor(s, 1, cooldown_from=10, max_steps=20) for s in (9, 10, 15, 20)] == [1.0, 1.0, 0.5, 0.0]


def test_resume_into_cooldown(digits_tree, tmp_path, capsys):
    """A constant-rate run resumed with --cooldown-from decays from that step: the rate is a function of the step."""
    from p1_ddpm.train import main as train_main
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--batch-size", "8", "--channels", "8,16",
            "--val-every", "2", "--warmup-steps", "1", "--lr", "1e-3"]
    _train(base + ["--max-steps", "2"])
    lr_of = lambda: torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)[
        "optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr_of() == pytest.approx(1e-3)
    _train(base + ["--max-steps", "3", "--cooldown-from", "1", "--val-every", "3", "--resume"])
    assert lr_of() == pytest.approx(0.0)  # step 3 of a fall from step 1 to 3
    code, err = run_cli(train_main, base + ["--max-steps", "3", "--cooldown-from", "3"], capsys)
    assert code == 2 and "--cooldown-from" in err


def test_train_ddp_on_cpu(digits_tree, tmp_path):
    """--devices 2 runs Lightning's DDP (gloo on CPU): the same code path as multi-GPU training."""
    out = tmp_path / "ddp"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "p1_ddpm" / "train.py"),
            "--data",
            str(digits_tree),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--channels",
            "8,16",
            "--val-every",
            "2",
            "--warmup-steps",
            "1",
            "--max-steps",
            "2",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done:") == 1  # rank 0 reports once
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 2
    assert "world_size=2" in r.stderr or "distributed_backend=gloo" in r.stderr
    load_unet(out / "model.safetensors")


def test_train_with_compile(digits_tree, tmp_path):
    """--compile (meant for CUDA) goes through torch.compile on CPU too, and checkpoints keep plain names."""
    out = tmp_path / "compiled"
    _train(["--data", str(digits_tree), "--out", str(out), "--batch-size", "8", "--channels", "8,16",
            "--val-every", "2", "--warmup-steps", "1", "--max-steps", "2", "--compile"])
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 2 and not any("_orig_mod" in k for k in ck["state_dict"])
    load_unet(out / "model.safetensors")


def test_train_bad_inputs(digits_tree, tmp_path, capsys):
    import dataclasses
    import shutil

    from p1_ddpm.train import P1TrainConfig
    from p1_ddpm.train import main as train_main
    # Lightning reads a float as a share and an int as a count: 2.0 from the parser is two batches
    for given, read in ((0.25, 0.25), (1.0, 1.0), (2.0, 2)):
        value = dataclasses.replace(P1TrainConfig(), limit_val_batches=given).val_batches()
        assert value == read and type(value) is type(read)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(digits_tree, broken)
    lines = (broken / "svhn" / "train.csv").read_text().splitlines()
    missing_name = lines[1].split(",")[0]
    (broken / "svhn" / "data" / missing_name).unlink()
    for data, needle in ((tmp_path / "nope", "nope"), (empty, "mnistm"), (broken, missing_name)):
        out = tmp_path / f"out_{data.name}"
        code, err = run_cli(train_main, ["--data", str(data), "--out", str(out), "--max-steps", "1"], capsys)
        assert code not in (0, None) and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # nothing written
    code, err = run_cli(train_main, ["--data", str(digits_tree), "--out", str(tmp_path / "o"), "--resume",
                                     str(tmp_path / "no.ckpt")], capsys)
    assert code not in (0, None) and "no.ckpt" in err
    code, err = run_cli(train_main, ["--data", str(digits_tree), "--out", str(tmp_path / "o2"), "--grad-clip", "-1"],
                        capsys)
    assert code == 2 and "--grad-clip" in err and not (tmp_path / "o2").exists()
    # numbers out of range or not finite stop at the parser, before anything is written (they once ran to a
    # traceback, or to NaN weights)
    for flags, said in ((["--lr", "nan"], "--lr: must be a finite number"), (["--lr", "-1"], "--lr: must be >= 0"),
                        (["--batch-size", "0"], "--batch-size: must be >= 1"),
                        (["--val-every", "0"], "--val-every: must be >= 1"),
                        (["--max-steps", "-1"], "--max-steps: must be >= 1"),
                        (["--temperature", "nan"], "--temperature: must be a finite number"),
                        (["--dropout", "2"], "--dropout: must be < 1"),
                        (["--patch-size", "0"], "--patch-size: must be >= 1"),
                        (["--patch-size", "3"], "--patch-size 3 and 2 levels of --channels do not fit 28-px images"),
                        (["--channels", "8,16,32"], "2 and 3 levels of --channels do not fit 28-px images"),
                        (["--max-minutes", "-1"], "--max-minutes: must be > 0"),
                        (["--limit-val-batches", "2.5"], "--limit-val-batches: a share up to 1 or a whole count")):
        code, err = run_cli(train_main, ["--data", str(digits_tree), "--out", str(tmp_path / "o3")] + flags, capsys)
        assert code == 2 and said in err, (flags, err)
        assert not (tmp_path / "o3").exists()


def test_infer_refuses_non_finite_scales_and_too_many_steps(tiny_p1_checkpoint, tmp_path, capsys):
    """--guidance nan once wrote 1000 black images with exit 0; --steps above the model's T a traceback."""
    out = tmp_path / "out"
    for flags, said in ((["--guidance", "nan"], "--guidance: must be a finite number"),
                        (["--sampler", "ddim", "--eta", "nan"], "--eta: must be a finite number"),
                        (["--sampler", "ddim", "--eta", "-1"], "--eta: must be >= 0"),
                        (["--steps", "2000"], "--steps must be at most 1000"),
                        (["--sampler", "ddim", "--steps", "1001"], "--steps must be at most 1000"),
                        (["--task", "iclevr", "--guidance", "inf"], "--guidance: must be a finite number")):
        code, err = run_cli(infer_main, ["--checkpoint", str(tiny_p1_checkpoint), "--out", str(out)] + flags, capsys)
        assert code == 2 and said in err, (flags, err)
        assert not out.exists()


def test_infer_bad_batch_size_and_device_are_one_line_errors(tiny_p1_checkpoint, tmp_path, capsys):
    for flags in (["--batch-size", "0"], ["--batch-size", "-5"], ["--device", "tpu"], ["--device", "foo"]):
        out = tmp_path / "out"
        code, err = run_cli(infer_main, ["--checkpoint", str(tiny_p1_checkpoint), "--out", str(out)] + FAST + flags,
                            capsys)
        # --device is checked by the command (one line); --batch-size by the parser (its usage, then one line)
        assert code == 2 and flags[0] in err.strip().splitlines()[-1] and "Traceback" not in err, err
        assert not out.exists()


# --------------------------------------------------------------- write failures and interruptions (issue 18)

def test_infer_write_failure_is_one_line_and_leaves_nothing(tiny_p1_checkpoint, tmp_path, capsys, monkeypatch):
    """A full disk (ENOSPC, injected into PIL's write of the 31st image): one line naming the file and the
    error, exit 2, no image and no mnistm/ svhn/ folder added; a file that was there before stays as it was."""
    import errno
    saved = []

    def save(self, fp, *args, **kwargs):
        if len(saved) == 30:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code, err = run_cli(infer_main, ["--year", "2025", "--out", str(out), "--checkpoint", str(tiny_p1_checkpoint)]
                        + FAST, capsys)
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    (out / "mnistm").mkdir(parents=True)
    (out / "mnistm" / "0_001.png").write_bytes(b"an earlier run's")
    saved.clear()
    code, err = run_cli(infer_main, ["--year", "2025", "--out", str(out), "--checkpoint", str(tiny_p1_checkpoint)]
                        + FAST, capsys)
    assert code == 2 and "No space left on device" in err
    assert [str(p.relative_to(out)) for p in sorted(out.rglob("*"))] == ["mnistm", "mnistm/0_001.png"]
    assert (out / "mnistm" / "0_001.png").read_bytes() == b"an earlier run's"


def test_infer_unwritable_out_fails_before_any_model_work(tiny_p1_checkpoint, capsys, monkeypatch):
    """/proc passes os.access as root but takes no new file: found by writing a probe, before the model is
    loaded (digits and i-CLEVR)."""
    import p1_ddpm.infer as infer

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(infer, "load_unet", no_model_work)
    for task in ("digits", "iclevr"):
        code, err = run_cli(infer_main, ["--task", task, "--out", "/proc/hw2_p1", "--checkpoint",
                                         str(tiny_p1_checkpoint)] + FAST, capsys)
        assert code == 2 and "/proc/hw2_p1: cannot write here" in err and len(err.strip().splitlines()) == 1, err


def _slow_writes_env(tmp_path: Path) -> dict:
    """The environment of a child whose PNG writes each take 20 ms (a sitecustomize on PYTHONPATH), so that a
    signal can be sent while it writes."""
    hook = tmp_path / "slow_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import time\nfrom PIL import Image\n_save = Image.Image.save\n\n\n"
        "def save(self, *args, **kwargs):\n    time.sleep(0.02)\n    return _save(self, *args, **kwargs)\n\n\n"
        "Image.Image.save = save\n")
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(hook))


def _temps(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.is_file()] if out.is_dir() else []


def _start_and_signal(cmd, env, out: Path, sig, timeout: float = 120) -> tuple[int, str]:
    """Run cmd, wait until it has written at least 5 (temporary) files into out, send `sig`; (exit code, stderr)."""
    import signal
    import time
    err_file = out.parent / f"stderr_{int(sig)}.txt"
    with open(err_file, "w") as err:
        # a suite started in the background (`pytest ... &`) inherits SIGINT ignored, and so would the child
        # (a shell and Python keep an ignored SIGINT ignored); the child gets the default, as from a terminal
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + timeout
            while len(_temps(out)) < 5:
                assert proc.poll() is None, f"ended before it wrote anything: {err_file.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no files written in time"
                time.sleep(0.01)
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert sig != signal.SIGKILL or code == -signal.SIGKILL
    return code, err_file.read_text()


@pytest.mark.parametrize("sig,code,message", [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")])
def test_hw2_1_interrupted_while_writing_leaves_nothing(tiny_p1_checkpoint, tmp_path, sig, code, message):
    """SIGTERM (as Ctrl-C) while hw2_1.sh writes its images: one line, a non-zero exit, and no file, temp file or
    empty mnistm/ svhn/ folder left behind."""
    import signal
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "hw2_1.sh"), str(out), "--checkpoint", str(tiny_p1_checkpoint)] + FAST
    got, err = _start_and_signal(cmd, _slow_writes_env(tmp_path), out, getattr(signal, sig))
    assert got == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(message), err[-2000:]
    assert not out.exists() or list(out.rglob("*")) == []


def test_hw2_1_rerun_after_kill_9_ends_with_exactly_the_expected_files(tiny_p1_checkpoint, tmp_path):
    """kill -9 while writing leaves hidden temp files (nothing can clean up then); a rerun into the same folder
    deletes them and ends with exactly the 500 + 500 images."""
    import signal
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "hw2_1.sh"), str(out), "--checkpoint", str(tiny_p1_checkpoint)] + FAST
    _start_and_signal(cmd, _slow_writes_env(tmp_path), out, signal.SIGKILL)
    assert _temps(out)  # what a killed run leaves
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["mnistm", "svhn"]
    _check_folder(out / "mnistm", range(0, 10, 2), 50)
    _check_folder(out / "svhn", range(1, 10, 2), 50)


def test_channels_last_training_on_the_cpu_gives_the_same_loss_and_gradients():
    """The module's CUDA branch (channels_last weights, EMA and inputs; train.py takes it on a GPU) run on the
    CPU: the same loss and gradients as the default layout, and the EMA update keeps working."""
    import dataclasses

    from p1_ddpm.train import TASK_CONFIGS, DiffusionModule
    train = dataclasses.asdict(TASK_CONFIGS["digits"])
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([[1, 0], [2, 1], [3, 0], [4, 1]])
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = DiffusionModule(model_config=tiny_unet_config(), train=train, channels_last=channels_last)
        loss = module.diffusion_loss(module.model, images, cond, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads = [p.grad.clone() for p in module.model.parameters()]
        module.ema.update(module.model)
        results.append((loss.detach(), grads, module))
    (loss_a, grads_a, _), (loss_b, grads_b, nhwc) = results
    assert convs_are_channels_last(nhwc.ema.module)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads_a, grads_b))
    assert int(nhwc.ema.num_updates) == 1
