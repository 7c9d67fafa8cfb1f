"""Digit classifiers and scripts/evaluate_digits.py on real digits from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from common.checkpoint import save_checkpoint
from scripts import evaluate_digits
from scripts.digit_classifiers import CourseLeNet, SvhnNet, load_course_lenet, load_svhn_net, predict, save_svhn_net
from tests.conftest import REPO, SHARED, shared_data

LENET_PATH = SHARED / "dlcv" / "Classifier.pth"
SVHN_CHECKPOINT = REPO / "checkpoints" / "svhn_classifier.safetensors"

torch.set_num_threads(1)


def need_shared():
    shared_data()  # skips, counted in the run's closing line, when ../shared/data is absent


@pytest.fixture(scope="module")
def mnistm_test():
    need_shared()
    with np.load(SHARED / "digits" / "mnistm.npz") as z:
        return z["x_test"][:500], z["y_test"][:500].astype(np.int64)


@pytest.fixture(scope="module")
def svhn_test():
    need_shared()
    from scripts.prepare_digits import to_rgb28
    with np.load(SHARED / "digits" / "svhn_partial.npz") as z:
        x, y = z["x_train"][900:], z["y_train"][900:].astype(np.int64)
    return np.stack([to_rgb28(im) for im in x]), y


@pytest.fixture(scope="module")
def lenet():
    need_shared()
    return load_course_lenet(LENET_PATH)


@pytest.fixture(scope="module")
def svhn_net():
    return load_svhn_net(SVHN_CHECKPOINT)


def test_course_lenet_scores_mnistm(lenet, mnistm_test):
    x, y = mnistm_test
    labels, probs = predict(lenet, x)
    assert probs.shape == (500, 10)
    assert torch.allclose(probs.sum(1), torch.ones(500), atol=1e-5)
    acc = (labels.numpy() == y).mean()
    assert acc >= 0.85, acc
    # NCHW input gives the same answer as NHWC
    labels2, _ = predict(lenet, torch.from_numpy(x).permute(0, 3, 1, 2), batch_size=64)
    assert torch.equal(labels, labels2)


def test_lenet_accepts_bare_state_dict(tmp_path, lenet):
    path = tmp_path / "bare.pth"
    torch.save(lenet.state_dict(), path)
    again = load_course_lenet(path)
    for k, v in lenet.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_shipped_svhn_net_above_chance(svhn_net, svhn_test):
    x, y = svhn_test
    labels, _ = predict(svhn_net, x)
    acc = (labels.numpy() == y).mean()
    assert acc > 0.5, acc


def test_svhn_net_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SvhnNet(widths=(8, 8, 16)).eval()
    path = save_svhn_net(tmp_path / "s.safetensors", model, {"seed": 0}, {"val_accuracy": 0.5}, dtype=None)
    again = load_svhn_net(path)
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    assert torch.equal(predict(model, x)[1], predict(again, x)[1])


def write_digits(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (im, lab) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(folder / f"{lab}_{i:03d}.png")


def test_evaluate_course_layout(tmp_path, lenet, svhn_net, mnistm_test, svhn_test, capsys):
    xm, ym = mnistm_test[0][:40], mnistm_test[1][:40]
    xs, ys = svhn_test[0][:40], svhn_test[1][:40]
    write_digits(tmp_path / "out" / "mnistm", xm, ym)
    write_digits(tmp_path / "out" / "svhn", xs, ys)
    expect_m = int((predict(lenet, xm)[0].numpy() == ym).sum())
    expect_s = int((predict(svhn_net, xs)[0].numpy() == ys).sum())

    report = evaluate_digits.evaluate_folder(tmp_path / "out", lenet, svhn_net)
    assert report["sets"]["mnistm"]["correct"] == expect_m
    assert report["sets"]["svhn"]["correct"] == expect_s
    assert report["sets"]["svhn"]["classifier"] == "SvhnNet"

    js = tmp_path / "scores.json"
    evaluate_digits.main(["--folder", str(tmp_path / "out"), "--checkpoint", str(LENET_PATH),
                          "--svhn-checkpoint", str(SVHN_CHECKPOINT), "--json", str(js)])
    out = capsys.readouterr().out.strip().splitlines()
    mean = (expect_m / 40 + expect_s / 40) / 2
    assert out[-1] == f"mean accuracy {mean:.4f}"
    import json
    saved = json.loads(js.read_text())
    assert saved["mean_accuracy"] == pytest.approx(mean)
    assert saved["sets"]["mnistm"]["total"] == 40


def test_evaluate_flat_layout(tmp_path, lenet, mnistm_test, capsys):
    x, y = mnistm_test[0][100:130], mnistm_test[1][100:130]
    write_digits(tmp_path / "flat", x, y)
    expect = int((predict(lenet, x)[0].numpy() == y).sum())
    report = evaluate_digits.main(["--folder", str(tmp_path / "flat"), "--checkpoint", str(LENET_PATH)])
    (name, r), = report["sets"].items()
    assert r["classifier"] == "CourseLeNet" and r["correct"] == expect and r["total"] == 30
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"mean accuracy {expect / 30:.4f}"


def run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate_digits.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture()
def good_folder(tmp_path, mnistm_test):
    folder = tmp_path / "good"
    write_digits(folder, mnistm_test[0][:3], mnistm_test[1][:3])
    return folder


def test_error_missing_folder(tmp_path, capsys, lenet):
    missing = tmp_path / "nope"
    assert str(missing) in run_error(capsys, ["--folder", str(missing), "--checkpoint", str(LENET_PATH)])


def test_error_folder_without_pngs(tmp_path, capsys, lenet):
    (tmp_path / "empty" / "mnistm").mkdir(parents=True)
    (tmp_path / "empty" / "mnistm" / "notes.txt").write_text("hi")
    msg = run_error(capsys, ["--folder", str(tmp_path / "empty"), "--checkpoint", str(LENET_PATH)])
    assert str(tmp_path / "empty" / "mnistm") in msg
    (tmp_path / "bare").mkdir()
    assert str(tmp_path / "bare") in run_error(
        capsys, ["--folder", str(tmp_path / "bare"), "--checkpoint", str(LENET_PATH)]
    )


def test_error_folder_with_both_layouts(good_folder, capsys, mnistm_test):
    """Loose PNGs beside mnistm/: scoring either layout would silently drop the other."""
    write_digits(good_folder / "mnistm", mnistm_test[0][:2], mnistm_test[1][:2])
    msg = run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(LENET_PATH)])
    assert str(good_folder) in msg and "both PNGs" in msg and "mnistm/" in msg


def test_error_bad_file_name(good_folder, capsys, mnistm_test):
    Image.fromarray(mnistm_test[0][0]).save(good_folder / "x_001.png")
    msg = run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(LENET_PATH)])
    assert "x_001.png" in msg


def test_error_corrupt_and_wrong_size_png(good_folder, tmp_path, capsys):
    (good_folder / "3_999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "3_999.png" in run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(LENET_PATH)])
    (good_folder / "3_999.png").unlink()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good_folder / "4_998.png")
    assert "4_998.png" in run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(LENET_PATH)])


def test_error_bad_checkpoints(good_folder, tmp_path, capsys):
    # a safetensors checkpoint of another kind, given as the SVHN classifier
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, {"w": torch.zeros(2)}, "p1_ddpm.ConditionalUNet", {})
    svhn_dir = tmp_path / "gen"
    (svhn_dir / "svhn").mkdir(parents=True)
    for f in good_folder.iterdir():
        (svhn_dir / "svhn" / f.name).write_bytes(f.read_bytes())
    assert str(other) in run_error(capsys, ["--folder", str(svhn_dir), "--svhn-checkpoint", str(other)])
    # a truncated SvhnNet checkpoint
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(SVHN_CHECKPOINT.read_bytes()[:1000])
    assert str(trunc) in run_error(capsys, ["--folder", str(svhn_dir), "--svhn-checkpoint", str(trunc)])
    # a plain safetensors file (no kind) and a truncated .pth, given as the course LeNet
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert str(plain) in run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(plain)])
    if LENET_PATH.is_file():
        cut = tmp_path / "cut.pth"
        cut.write_bytes(LENET_PATH.read_bytes()[:5000])
        assert str(cut) in run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(cut)])
    # a LeNet of the wrong shape
    wrong = tmp_path / "wrong.pth"
    sd = CourseLeNet().state_dict()
    sd["fc3.weight"] = torch.zeros(5, 64)
    torch.save({"state_dict": sd}, wrong)
    assert str(wrong) in run_error(capsys, ["--folder", str(good_folder), "--checkpoint", str(wrong)])
    # a missing checkpoint; none given for an MNIST-M folder scores it with our MNIST-M classifier, whose file
    # is named when it is missing
    assert "missing.pth" in run_error(
        capsys, ["--folder", str(good_folder), "--checkpoint", str(tmp_path / "missing.pth")]
    )
    report = evaluate_digits.main(["--folder", str(good_folder)])
    assert next(iter(report["sets"].values()))["classifier"] == "MnistmNet"
    capsys.readouterr()
    assert "nomnistm.safetensors" in run_error(
        capsys, ["--folder", str(good_folder), "--mnistm-checkpoint", str(tmp_path / "nomnistm.safetensors")]
    )


def test_error_non_safetensors_file_named_safetensors(good_folder, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 2)
    for flag in ("--checkpoint", "--svhn-checkpoint"):
        folder = good_folder if flag == "--checkpoint" else tmp_path / "gen"
        if flag == "--svhn-checkpoint":
            (folder / "svhn").mkdir(parents=True)
            for f in good_folder.iterdir():
                (folder / "svhn" / f.name).write_bytes(f.read_bytes())
        assert str(junk) in run_error(capsys, ["--folder", str(folder), flag, str(junk)])


def test_folder_that_is_a_file_and_dot_folders(good_folder, tmp_path, capsys):
    a_png = next(good_folder.iterdir())
    assert "is a file, not a folder" in run_error(capsys, ["--folder", str(a_png)])
    gen = tmp_path / "gen2"
    (gen / "._svhn").mkdir(parents=True)  # a macOS dot-folder is not a set
    (gen / "mnistm").mkdir()
    msg = run_error(capsys, ["--folder", str(gen)])
    assert "mnistm" in msg and "._svhn" not in msg
