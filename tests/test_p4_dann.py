"""Problem 4 (DANN): the reversal layer, the schedules, training in each mode on real digits, inference
csv, t-SNE plots, the report table, and bad inputs."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p4_dann.augment import AugmentConfig, augment
from p4_dann.data import DomainAdaptationData
from p4_dann.infer import main as infer_main
from p4_dann.infer import target_from_path
from p4_dann.model import (
    DANN,
    SOURCE,
    TARGET,
    GradientReversal,
    dann_lr_factor,
    grl_coefficient,
    load_dann,
    predict_logits,
    reverse_gradient,
    save_dann,
)
from p4_dann.train import DANNModule, P4TrainConfig
from p4_dann.train import main as train_main
from tests.conftest import REPO, run_cli, shared_data

TINY = dict(widths=(4, 8, 8), feature_dim=16, dropout=0.0)
TINY_FLAGS = ["--widths", "4,8,8", "--feature-dim", "16", "--batch-size", "16", "--refresh-rate", "0"]


def tiny_checkpoint(path: Path, target: str, mode: str = "dann", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = DANN(**TINY)  # shared BatchNorm statistics: index 0 for every domain
    return save_dann(path, model, 0, {"source": "mnistm", "target": target, "mode": mode})


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ---------------------------------------------------------------- reversal layer and schedules

def test_gradient_reversal_negates_and_scales_exactly():
    torch.manual_seed(0)
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(5, 7)
    for coeff in (0.0, 0.37, 1.0, 2.5):
        x.grad = None
        y = reverse_gradient(x, coeff)
        assert torch.equal(y, x)  # forward: identity
        (y * w).sum().backward()
        assert torch.equal(x.grad, -coeff * w)
    layer = GradientReversal(0.25)
    x.grad = None
    (layer(x) * w).sum().backward()
    assert torch.equal(x.grad, -0.25 * w)


def test_gradient_reversal_inside_the_model_flips_the_domain_gradient():
    """Through the GRL the feature extractor gets -coeff times the gradient the domain head would give it."""
    torch.manual_seed(0)
    model = DANN(**TINY).eval()
    x = torch.randn(6, 3, 28, 28)
    grads = []
    for coeff in (-1.0, 0.5):  # -1: a plain (un-reversed) pass, as reference
        model.zero_grad()
        model.domain_logits(model.extract(x, SOURCE), coeff).sum().backward()
        grads.append(model.features[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], -0.5 * grads[0], rtol=1e-5, atol=1e-7)


def test_schedule_endpoints():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(1.0) > 0.9999
    assert grl_coefficient(-3) == 0.0 and grl_coefficient(5) == grl_coefficient(1.0)  # clamped to [0, 1]
    values = [grl_coefficient(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert dann_lr_factor(0.0) == 1.0
    assert dann_lr_factor(1.0) == pytest.approx(11 ** -0.75)
    lrs = [dann_lr_factor(p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_domain_batchnorm_keeps_one_set_of_statistics_per_domain():
    torch.manual_seed(0)
    model = DANN(**TINY, num_domains=2).train()
    bn = model.features[1]
    model.extract(torch.randn(8, 3, 28, 28), SOURCE)
    after_source = bn.running_mean.clone()
    assert not torch.equal(after_source[0], torch.zeros_like(after_source[0]))
    assert torch.equal(after_source[1], torch.zeros_like(after_source[1]))  # target row untouched
    model.extract(torch.randn(8, 3, 28, 28) + 3, TARGET)
    assert torch.equal(bn.running_mean[0], after_source[0])
    assert not torch.equal(bn.running_mean[1], after_source[1])


def test_augment_is_seeded_and_keeps_range():
    images = torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8)
    cfg = AugmentConfig(affine=1, invert=0.5, channel_shuffle=0.5, grey=0.3, jitter=0.3, colourize=0.5)
    a = augment(images, cfg, torch.Generator().manual_seed(3))
    b = augment(images, cfg, torch.Generator().manual_seed(3))
    c = augment(images, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 255
    grey = images[:, :1].expand(-1, 3, -1, -1)
    painted = augment(grey, AugmentConfig(affine=0, colourize=1.0), torch.Generator().manual_seed(0))
    assert (painted[:, 0] - painted[:, 1]).abs().mean() > 1  # colour where there was none


# ---------------------------------------------------------------- data and training

def test_prepare_digits_finds_the_shared_data_from_any_working_directory(tmp_path, monkeypatch, capsys):
    """--npz-dir's default was ../shared/data/digits from the working directory, not from the repository."""
    from scripts.prepare_digits import main as prepare
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        prepare(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"(default: {REPO.parent / 'shared' / 'data' / 'digits'})" in shown, shown


def test_prepare_digits_writes_mnist_as_rgb(tmp_path, capsys):
    from scripts.prepare_digits import main as prepare
    code, err = run_cli(prepare, ["--npz-dir", str(shared_data() / "digits"), "--out", str(tmp_path),
                                  "--datasets", "mnist", "--limit", "20"], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "mnist" / "train.csv")
    assert rows[0] == ["image_name", "label"] and len(rows) == 1 + 18
    assert len(read_csv(tmp_path / "mnist" / "test.csv")) == 1 + 20
    with np.load(shared_data() / "digits" / "mnist.npz") as z:
        first = z["x_train"][int(rows[1][0][:5])]
        label = int(z["y_train"][int(rows[1][0][:5])])
    img = np.asarray(Image.open(tmp_path / "mnist" / "data" / rows[1][0]))
    assert img.shape == (28, 28, 3) and np.array_equal(img[..., 0], first) and np.array_equal(img[..., 2], first)
    assert int(rows[1][1]) == label
    code, err = run_cli(prepare, ["--out", str(tmp_path), "--datasets", "mnist,kmnist"], capsys)
    assert code == 2 and "kmnist" in err
    code, err = run_cli(prepare, ["--out", str(tmp_path / "none"), "--datasets", ","], capsys)
    assert code == 2 and "--datasets names no data set" in err and not (tmp_path / "none").exists()
    code, err = run_cli(prepare, ["--out", str(tmp_path / "none"), "--limit", "-1"], capsys)
    assert code == 2 and "--limit: must be >= 1" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    np.savez(odd / "mnist.npz", x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.zeros(4, np.int64))
    code, err = run_cli(prepare, ["--npz-dir", str(odd), "--out", str(tmp_path / "none"), "--datasets", "mnist"],
                        capsys)
    assert code == 2 and "mnist.npz: x_train holds 3 images but y_train 4 labels" in err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("mode,num_domains", [("source", 1), ("dann", 1), ("dann", 2), ("target", 1), ("target", 2)])
def test_a_few_steps_lower_the_loss_in_each_mode(digits_tree, mode, num_domains):
    data = DomainAdaptationData(str(digits_tree), "mnistm", "usps", mode, batch_size=32, seed=0)
    data.setup()
    if mode == "dann":
        assert not isinstance(data.train_sets["target"][0], tuple)  # the target's labels never reach training
    batch = next(iter(data.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch  # CombinedLoader yields (batch, idx, dataloader_idx)
    torch.manual_seed(0)
    # both domains with AugmentConfig's own (light) augmentation, not the scenario's
    plain_aug = {f"{d}_{k}": v for d in ("src", "tgt") for k, v in AugmentConfig().as_dict().items()}
    train = dataclasses.asdict(dataclasses.replace(P4TrainConfig(), lr=0.05, **plain_aug))
    module = DANNModule(model_config=dict(TINY, num_domains=num_domains), train=train, mode=mode, total_steps=30,
                        seed=0)
    assert module.eval_domain == (TARGET if num_domains == 2 and mode != "source" else 0)
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    module.log_dict = lambda d, **kw: logged.update({k: float(torch.as_tensor(v).detach()) for k, v in d.items()})
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for step in range(30):
        loss = module.training_step(batch, step)
        losses.append(logged["train_cls_loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(losses[-1])
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    if mode == "dann":
        assert 0 <= logged["train_dom_acc"] <= 1 and math.isfinite(logged["train_dom_loss"])


def test_train_cli_exports_chooses_on_source_val_and_resumes(digits_tree, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--source", "mnistm", "--target", "svhn", "--mode", "dann",
            *TINY_FLAGS, "--val-every", "2"]
    train_main([*base, "--max-steps", "3"])
    for name in ("best.safetensors", "best.json", "model.safetensors", "last.ckpt"):
        assert (out / name).is_file(), name
    info = json.loads((out / "best.json").read_text())
    assert info["metrics"]["selected_on"] == "val_source_acc"
    assert info["config"]["target"] == "svhn" and info["config"]["eval_domain"] == 0  # shared BatchNorm
    assert info["config"]["total_steps"] == 3
    model, config = load_dann(out / "best.safetensors")
    assert model.config["widths"] == [4, 8, 8]
    last = json.loads((out / "model.json").read_text())["metrics"]
    assert last["global_step"] == 3  # the final weights were validated although 3 is not a multiple of 2
    train_main([*base, "--max-steps", "5", "--resume"])
    assert json.loads((out / "model.json").read_text())["metrics"]["global_step"] == 5


def test_resume_refuses_other_settings_and_keeps_its_own(digits_tree, tmp_path, capsys):
    """--resume with another --target, --mode, --seed or --lr once exited 0 and exported a model.json that
    named settings it was not trained with (infer.py then refused the USPS model as an SVHN one)."""
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--mode", "dann", *TINY_FLAGS, "--val-every", "2"]
    train_main([*base, "--max-steps", "2", "--lr", "0.05", "--seed", "3"])
    before = (out / "last.ckpt").read_bytes()
    for flags, said in ((["--target", "svhn"], "--target usps (not svhn)"), (["--mode", "source"], "--mode dann"),
                        (["--seed", "4"], "--seed 3 (not 4)"), (["--lr", "0.5"], "--lr 0.05 (not 0.5)")):
        code, err = run_cli(train_main, [*base, "--max-steps", "4", "--resume", *flags], capsys)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert (out / "last.ckpt").read_bytes() == before
    train_main([*base, "--max-steps", "3", "--resume"])  # --lr and --seed left off: the checkpoint's
    info = json.loads((out / "model.json").read_text())
    assert info["config"]["train"]["lr"] == 0.05 and info["config"]["train"]["seed"] == 3
    assert info["metrics"]["global_step"] == 3


def test_resume_with_max_steps_extends_a_max_epochs_run(digits_tree, tmp_path):
    """--max-steps given when resuming a --max-epochs run was ignored without a word (the epochs decided)."""
    out = tmp_path / "run"
    base = ["--data", str(digits_tree), "--out", str(out), "--mode", "source", *TINY_FLAGS, "--val-every", "2"]
    train_main([*base, "--max-epochs", "1"])
    first = json.loads((out / "model.json").read_text())["metrics"]["global_step"]
    train_main([*base, "--max-steps", str(first + 2), "--resume"])
    info = json.loads((out / "model.json").read_text())
    assert info["metrics"]["global_step"] == first + 2 and info["config"]["train"]["max_epochs"] is None


def test_target_mode_chooses_on_target_val(digits_tree, tmp_path):
    out = tmp_path / "run"
    train_main(["--data", str(digits_tree), "--out", str(out), "--source", "mnistm", "--target", "usps",
                "--mode", "target", *TINY_FLAGS, "--max-steps", "2", "--val-every", "2", "--bn", "domain"])
    info = json.loads((out / "best.json").read_text())
    assert info["metrics"]["selected_on"] == "val_target_acc" and "val_source_acc" not in info["metrics"]
    assert info["config"]["eval_domain"] == TARGET and info["config"]["model"]["num_domains"] == 2


def test_same_seed_same_weights(digits_tree, tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        train_main(["--data", str(digits_tree), "--out", str(out), "--mode", "dann", *TINY_FLAGS,
                    "--max-steps", "3", "--val-every", "3", "--seed", "5"])
        runs.append(load_dann(out / "model.safetensors")[0].state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# ---------------------------------------------------------------- inference

def test_infer_writes_sorted_csv_with_header(digits_tree, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "usps.safetensors", "usps")
    image_dir = digits_tree / "usps" / "data"
    out = tmp_path / "pred" / "usps_pred.csv"
    code, err = run_cli(infer_main, [str(image_dir), str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 0, err
    rows = read_csv(out)
    assert rows[0] == ["image_name", "label"]
    names = sorted(p.name for p in image_dir.iterdir())
    assert [r[0] for r in rows[1:]] == names
    assert all(r[1].isdigit() and 0 <= int(r[1]) <= 9 and len(r) == 2 for r in rows[1:])
    # the same predictions as the model gives the decoded images directly
    model, config = load_dann(ckpt)
    imgs = torch.from_numpy(np.stack([np.asarray(Image.open(image_dir / n).convert("RGB")) for n in names]))
    expected = predict_logits(model, imgs.permute(0, 3, 1, 2), config["eval_domain"]).argmax(1).tolist()
    assert [int(r[1]) for r in rows[1:]] == expected


def test_hw2_dann_sh_reads_the_target_from_the_path(digits_tree, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "svhn.safetensors", "svhn")
    out = tmp_path / "svhn_pred.csv"
    r = subprocess.run(["bash", str(REPO / "hw2_dann.sh"), str(digits_tree / "svhn" / "data"), str(out),
                        "--checkpoint", str(ckpt)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                        "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "svhn" in r.stdout
    assert len(read_csv(out)) == 1 + len(list((digits_tree / "svhn" / "data").iterdir()))
    r = subprocess.run(["bash", str(REPO / "hw2_dann.sh"), str(digits_tree)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_target_from_path():
    assert target_from_path("/x/hw2_data/digits/usps/data") == "usps"
    assert target_from_path("/x/svhn/data") == "svhn"
    assert target_from_path("/usps_runs/svhn/data") == "svhn"  # the last one named wins
    assert target_from_path("/x/mnistm/data") is None


@pytest.mark.parametrize("name", ["usps", "svhn"])
def test_shipped_checkpoints_classify_real_target_images(digits_tree, name):
    """The shipped models on the first real test images of their target (USPS test, SVHN images 900+)."""
    ckpt = REPO / "checkpoints" / f"p4_dann_{name}.safetensors"
    model, config = load_dann(ckpt)
    assert config["target"] == name and config["mode"] == "dann"
    from common.datasets import CourseImageFolder
    test = CourseImageFolder(digits_tree, name, "test")
    acc = float((predict_logits(model, test.images, config["eval_domain"]).argmax(1) == test.labels).float().mean())
    assert acc >= {"usps": 0.9, "svhn": 0.35}[name], acc


# ---------------------------------------------------------------- report: table and t-SNE

def test_tsne_writes_both_plots(digits_tree, tmp_path):
    from p4_dann.data import load_split
    from p4_dann.report import tsne_plots
    torch.manual_seed(0)
    model = DANN(**TINY).eval()
    paths = tsne_plots(model, 0, load_split(digits_tree, "mnistm", "val"), load_split(digits_tree, "usps", "val"),
                       tmp_path / "tsne_mnistm_usps", "MNIST-M → USPS")
    assert [p.name for p in paths] == ["tsne_mnistm_usps_digit.png", "tsne_mnistm_usps_domain.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (600, 600)


@pytest.mark.slow  # trains three runs, two of them in child processes
def test_report_trains_loads_and_writes_the_table(digits_tree, tmp_path, capsys):
    from p4_dann.report import main as report_main
    argv = ["--data", str(digits_tree), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
            "--scenarios", "mnistm-usps", "--train-args", "--max-steps 2 --val-every 2 " + " ".join(TINY_FLAGS),
            "--tsne-count", "6", "--refresh-rate", "0"]
    # --jobs 2: the three runs train in two child processes at a time
    code, err = run_cli(report_main, [*argv, "--jobs", "2"], capsys)
    assert code == 0, err
    timing = json.loads((tmp_path / "runs" / "mnistm_usps" / "dann" / "train_time.json").read_text())
    assert timing["parallel_jobs"] == 2 and "--mode" in timing["argv"]
    assert (tmp_path / "runs" / "mnistm_usps" / "dann" / "train.log").is_file()
    table = (tmp_path / "rep" / "p4_table.md").read_text()
    lines = table.splitlines()
    assert "MNIST-M → USPS" in lines[0]
    assert lines[2].startswith("| trained on source |") and lines[3].startswith("| DANN")
    assert lines[4].startswith("| trained on target |") and "%" in lines[3]
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    r = results["results"]["mnistm_usps"]
    assert set(r) == {"source", "dann", "target"} and all(0 <= v["test_acc"] <= 1 for v in r.values())
    assert r["dann"]["test_count"] == 60 and r["dann"]["train_seconds"] > 0
    assert (tmp_path / "rep" / "tsne_mnistm_usps_digit.png").is_file()
    assert (tmp_path / "rep" / "tsne_mnistm_usps_domain.png").is_file()
    # a second call loads the runs instead of training them
    stamp = (tmp_path / "runs" / "mnistm_usps" / "dann" / "best.safetensors").stat().st_mtime_ns
    code, err = run_cli(report_main, [*argv, "--no-tsne"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "mnistm_usps" / "dann" / "best.safetensors").stat().st_mtime_ns == stamp
    # a run cut short (no train_time.json: it is written when a run ends) is trained again, not reported
    # with its mid-run best.json as if finished
    (tmp_path / "runs" / "mnistm_usps" / "source" / "train_time.json").unlink()
    stamp = (tmp_path / "runs" / "mnistm_usps" / "source" / "best.safetensors").stat().st_mtime_ns
    code, err = run_cli(report_main, [*argv, "--no-tsne", "--modes", "source"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "mnistm_usps" / "source" / "train_time.json").is_file()
    assert (tmp_path / "runs" / "mnistm_usps" / "source" / "best.safetensors").stat().st_mtime_ns != stamp
    # --retrain with the default --jobs 1 trains in this process
    code, err = run_cli(report_main, [*argv, "--no-tsne", "--retrain", "--modes", "source"], capsys)
    assert code == 0, err
    timing = json.loads((tmp_path / "runs" / "mnistm_usps" / "source" / "train_time.json").read_text())
    assert timing["parallel_jobs"] == 1 and not (tmp_path / "runs" / "mnistm_usps" / "source" / "train.log").exists()


# ---------------------------------------------------------------- bad inputs

def test_infer_bad_inputs(digits_tree, tmp_path, capsys, tiny_p1_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "usps.safetensors", "usps")
    out = tmp_path / "o.csv"
    usps_dir = digits_tree / "usps" / "data"

    empty = tmp_path / "usps_empty"
    empty.mkdir()
    code, err = run_cli(infer_main, [str(empty), str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "no images" in err

    broken = tmp_path / "usps_broken"
    broken.mkdir()
    (broken / "00001.png").write_text("not an image")
    code, err = run_cli(infer_main, [str(broken), str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "00001.png" in err and "not a readable image" in err

    code, err = run_cli(infer_main, [str(usps_dir), str(out), "--target", "mnist", "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "unknown target domain 'mnist'" in err

    code, err = run_cli(infer_main, [str(digits_tree / "mnistm" / "data"), str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "--target" in err and "cannot tell" in err

    code, err = run_cli(infer_main, [str(usps_dir), str(out), "--checkpoint", str(tiny_p1_checkpoint)], capsys)
    assert code == 2 and "kind" in err

    svhn_ckpt = tiny_checkpoint(tmp_path / "svhn.safetensors", "svhn")
    code, err = run_cli(infer_main, [str(usps_dir), str(out), "--checkpoint", str(svhn_ckpt)], capsys)
    assert code == 2 and "adapted to 'svhn'" in err

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:100])
    code, err = run_cli(infer_main, [str(usps_dir), str(out), "--checkpoint", str(truncated)], capsys)
    assert code == 2 and "cut.safetensors" in err

    code, err = run_cli(infer_main, [str(usps_dir), str(out), "--checkpoint", str(tmp_path / "missing.safetensors")],
                        capsys)
    assert code == 2 and "not found" in err
    assert not out.exists()  # no half-written output from any failure


def test_train_bad_inputs(digits_tree, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--data", str(digits_tree), "--out", str(out), *TINY_FLAGS, "--max-steps", "1"]
    code, err = run_cli(train_main, [*base, "--source", "emnist"], capsys)
    assert code == 2 and "emnist" in err
    code, err = run_cli(train_main, [*base, "--source", "usps", "--target", "usps"], capsys)
    assert code == 2 and "same" in err
    code, err = run_cli(train_main, [*base, "--target", "mnist"], capsys)  # no mnist/ in the tree
    assert code == 2 and "mnist" in err
    code, err = run_cli(train_main, [*base, "--widths", "4,8"], capsys)
    assert code == 2 and "--widths" in err
    code, err = run_cli(train_main, [*base[:-2], "--max-steps", "1", "--batch-size", "500"], capsys)
    assert code == 2 and "fewer than one batch" in err
    assert not out.exists()


def test_infer_quotes_names_with_commas_and_skips_dot_files(tmp_path, capsys):
    from common.datasets import read_label_csv
    ckpt = tiny_checkpoint(tmp_path / "usps.safetensors", "usps")
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    for name in ("a,b.png", "plain.png"):
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(image_dir / name)
    (image_dir / "._plain.png").write_bytes(b"\x00\x05macOS resource fork")
    out = tmp_path / "pred.csv"
    code, err = run_cli(infer_main, [str(image_dir), str(out), "--checkpoint", str(ckpt), "--target", "usps"], capsys)
    assert code == 0, err
    rows = read_label_csv(out)
    assert [n for n, _ in rows] == ["a,b.png", "plain.png"]
    assert out.read_text().splitlines()[1:] == [f'"a,b.png",{rows[0][1]}', f"plain.png,{rows[1][1]}"]
    code, err = run_cli(infer_main, [str(image_dir), str(tmp_path / "again.csv"), "--checkpoint", str(ckpt),
                                     "--target", "usps", "--labels", str(out)], capsys)
    assert code == 0, err


def test_resume_from_a_truncated_or_wrong_checkpoint_is_one_line_and_writes_nothing(digits_tree, tmp_path, capsys):
    """--resume with a last.ckpt that is truncated, another trainer's, or of a run with other --widths: one line
    naming the file, exit 2, before anything is written (no logs/)."""
    import os
    cfg = dataclasses.replace(P4TrainConfig(), widths="4,8,16", feature_dim=16, batch_size=16)
    other = DANNModule(model_config=dict(widths=[4, 8, 16], feature_dim=16, dropout=0.0, input_norm=cfg.input_norm,
                                         num_domains=1), train=dataclasses.asdict(cfg), mode="dann", total_steps=2)
    out = tmp_path / "run"
    out.mkdir()
    base = ["--data", str(digits_tree), "--out", str(out), "--source", "mnistm", "--target", "svhn", "--mode", "dann",
            *TINY_FLAGS, "--max-steps", "2", "--resume"]
    other_widths = {"state_dict": other.state_dict(), "global_step": 1, "hyper_parameters": dict(other.hparams)}
    torch.save(other_widths, out / "last.ckpt")
    whole = (out / "last.ckpt").read_bytes()
    cases = [
        (whole[: len(whole) // 2], "last.ckpt: not a checkpoint of p4_dann/train.py ("),
        ({"state_dict": {}, "global_step": 1, "hyper_parameters": {"model_config": {}, "train": {}}},
         "not a checkpoint of p4_dann/train.py (it has no hyper-parameter 'mode')"),
        (other_widths, "this run was trained with --widths 4,8,16 (not 4,8,8); --resume continues it as it was"),
    ]
    for content, needle in cases:
        if isinstance(content, bytes):
            (out / "last.ckpt").write_bytes(content)
        else:
            torch.save(content, out / "last.ckpt")
        code, err = run_cli(train_main, base, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert os.listdir(out) == ["last.ckpt"]


def test_infer_write_failures_are_one_line(tmp_path, capsys, monkeypatch):
    """hw2_dann: a full disk (ENOSPC from /dev/full) while writing the csv, and an output path that passes
    os.access but takes no file (/proc, as root): one line each, exit 2, nothing left behind; the /proc path is
    found before the model is loaded."""
    import os

    import p4_dann.infer as infer
    images = REPO / "assets" / "p4" / "usps"
    ckpt = tiny_checkpoint(tmp_path / "usps.safetensors", "usps")
    out = tmp_path / "pred" / "usps_pred.csv"

    def onto_a_full_device(self, text):
        with open("/dev/full", "w") as f:
            f.write(text)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", onto_a_full_device)
        code, err = run_cli(infer_main, [str(images), str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "usps_pred.csv: cannot write (No space left on device)" in err, err
    assert len(err.strip().splitlines()) == 1 and sorted(os.listdir(tmp_path)) == ["usps.json", "usps.safetensors"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(infer, "load_dann", no_model)
    code, err = run_cli(infer_main, [str(images), "/proc/usps_pred.csv", "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "/proc/usps_pred.csv: cannot write here" in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_labels_scores_the_images_both_files_list_and_says_what_it_left_out(tmp_path, capsys):
    """scripts/evaluate_labels.py (the course's DANN csv grader's arithmetic): a prediction csv covering 1 of 4
    labelled images printed "1/1 correct" and nothing else."""
    from scripts.evaluate_labels import main as evaluate_main
    labels = tmp_path / "labels.csv"
    labels.write_text("image_name,label\na.png,1\nb.png,2\nc.png,3\nd.png,4\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("image_name,label\nb.png,2\nc.png,0\nd.png,4\n")
    report = evaluate_main(["--pred", str(pred), "--labels", str(labels), "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert (report["correct"], report["total"], report["missing"]) == (2, 3, 1)
    assert "2/3 correct; accuracy 0.6667" in captured.out
    assert "1 of the 4 images in" in captured.err and json.loads((tmp_path / "r.json").read_text()) == report
    pred.write_text("image_name,label\nzzz.png,2\n")
    code, err = run_cli(evaluate_main, ["--pred", str(pred), "--labels", str(labels)], capsys)
    assert code == 2 and "names no image of" in err
