"""common/: image grids and PNGs, checkpoints, atomic writes, course-layout datasets."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_into, note_if_finished, read_checkpoint, save_checkpoint
from common.datasets import PNG_SUFFIXES, CourseImageFolder, list_images, read_label_csv
from common.errors import UserError
from common.fileio import atomic_path
from common.images import make_grid, save_png, to_uint8


def test_to_uint8_ranges():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    mm = to_uint8(torch.tensor([3.0, 5.0, 7.0, 9.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1), "minmax")
    assert mm[0, :, :, 0].tolist() == [[0, 85], [170, 255]]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_save_png_exact_name_and_rgb(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    save_png(tmp_path / "a" / "3_007.png", img)
    with Image.open(tmp_path / "a" / "3_007.png") as im:
        assert im.mode == "RGB" and im.size == (28, 28)
        assert np.array_equal(np.asarray(im), img)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["3_007.png"]  # no temp files left
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "3_007.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_grid_size_and_labels():
    imgs = np.zeros((6, 10, 10, 3), dtype=np.uint8)
    plain = make_grid(imgs, 2, 3, pad=2)
    assert plain.size == (3 * 12 + 2, 2 * 12 + 2)
    labelled = make_grid(imgs, 2, 3, row_labels=["a", "bbbb"], col_labels=["1", "2", "3"], pad=2)
    assert labelled.size[0] > plain.size[0] and labelled.size[1] > plain.size[1]
    with pytest.raises(ValueError):
        make_grid(imgs, 2, 2)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    lin = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "m.safetensors", lin.state_dict(), "test.Linear", {"a": 1}, {"acc": 0.5})
    state, cfg = read_checkpoint(path, "test.Linear")
    assert cfg == {"a": 1}
    other = torch.nn.Linear(3, 2)
    load_into(other, state, path)
    assert torch.equal(other.weight, lin.weight)
    assert '"acc": 0.5' in (tmp_path / "m.json").read_text()
    with pytest.raises(UserError, match="kind"):
        read_checkpoint(path, "other.Model")
    with pytest.raises(UserError, match="do not fit"):
        load_into(torch.nn.Sequential(torch.nn.Linear(3, 2)), state, path)
    with pytest.raises(UserError, match="shape mismatch"):
        load_into(torch.nn.Linear(4, 2), state, path)
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="t.safetensors"):
        read_checkpoint(trunc, "test.Linear")
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "none.safetensors", "test.Linear")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, bad):
    """A diverged run's weights (NaN/inf) must not load silently: one line naming the file and the tensor."""
    lin = torch.nn.Linear(3, 2)
    state = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    state["bias"][1] = bad
    path = save_checkpoint(tmp_path / "m.safetensors", state, "test.Linear", {})
    with pytest.raises(UserError, match=r"m\.safetensors: tensor 'bias' contains NaN or infinity"):
        read_checkpoint(path, "test.Linear")
    with pytest.raises(UserError, match=r"m\.safetensors: tensor 'bias' contains NaN or infinity"):
        load_into(torch.nn.Linear(3, 2), state, path)


def test_finite_check_is_exact_where_a_sum_overflows():
    """check_finite tests a tensor's sum first; a finite fp16 tensor whose sum overflows must still pass, and
    one NaN or infinity anywhere (also beside values that cancel it in no sum) must still be found."""
    from common.checkpoint import check_finite
    big = torch.full((4096,), 60000.0, dtype=torch.float16)  # finite, sum far beyond fp16's 65504
    assert not torch.isfinite(big.sum())
    check_finite({"big": big, "neg": -big, "bf16": big.bfloat16()}, "f.safetensors")
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            t = torch.zeros(1000, dtype=dtype)
            t[777] = bad
            with pytest.raises(UserError, match="'t' contains NaN or infinity"):
                check_finite({"ok": torch.ones(3), "t": t}, "f.safetensors")


def test_note_if_finished_speaks_only_at_the_last_step(capsys):
    note_if_finished("last.ckpt", {"global_step": 39}, 40)
    note_if_finished("last.ckpt", {"global_step": 40}, -1)  # no step limit (P4 by epochs sets one)
    assert capsys.readouterr().err == ""
    note_if_finished("last.ckpt", {"global_step": 40}, 40, "--max-epochs")
    err = capsys.readouterr().err
    assert "last.ckpt" in err and "(40 of 40)" in err and "raise --max-epochs" in err


def test_fp16_checkpoint(tmp_path):
    lin = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "h.safetensors", lin.state_dict(), "k", {}, dtype=torch.float16)
    state, _ = read_checkpoint(tmp_path / "h.safetensors", "k")
    assert state["weight"].dtype == torch.float16


def test_course_layout_loader_on_real_digits(digits_tree, digits_npz):
    ds = CourseImageFolder(digits_tree, "mnistm", "train")
    val = CourseImageFolder(digits_tree, "mnistm", "val")
    assert len(ds) + len(val) == 60
    img, label = ds[0]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and 0 <= label <= 9
    # the file name is the index in the npz: image and label must be the real ones
    idx = int(ds.image_names[0].split(".")[0])
    assert label == int(digits_npz["mnistm"]["y_train"][idx])
    assert np.array_equal(img.permute(1, 2, 0).numpy(), digits_npz["mnistm"]["x_train"][idx])
    usps = CourseImageFolder(digits_tree, "usps", "train")
    assert usps.images.shape[1:] == (3, 28, 28)  # grey 16x16 became RGB 28x28
    svhn_test = read_label_csv(digits_tree / "svhn" / "test.csv")
    assert len(svhn_test) == 60  # images 900.. of svhn_partial are the test split


def test_course_layout_bad_inputs(digits_tree, tmp_path):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(digits_tree / "mnistm", root / "mnistm")
    with pytest.raises(UserError, match="data set folder not found"):
        CourseImageFolder(root, "svhn", "train")
    with pytest.raises(UserError, match="data folder not found"):
        CourseImageFolder(tmp_path / "nothing", "mnistm", "train")
    first = read_label_csv(root / "mnistm" / "train.csv")[0][0]
    (root / "mnistm" / "data" / first).write_bytes(b"not a png")
    with pytest.raises(UserError, match=f"{first}: not a readable image"):
        CourseImageFolder(root, "mnistm", "train")
    Image.new("RGB", (32, 32)).save(root / "mnistm" / "data" / first)
    with pytest.raises(UserError, match="32x32, expected 28x28"):
        CourseImageFolder(root, "mnistm", "train")
    (root / "mnistm" / "data" / first).unlink()
    with pytest.raises(UserError, match=f"{first}: image not found"):
        CourseImageFolder(root, "mnistm", "train")
    (root / "mnistm" / "val.csv").write_text("name,label\n")
    with pytest.raises(UserError, match="expected header"):
        CourseImageFolder(root, "mnistm", "val")
    (root / "mnistm" / "val.csv").write_text("image_name,label\n")
    with pytest.raises(UserError, match="no rows"):
        CourseImageFolder(root, "mnistm", "val")


def test_list_images_one_lister(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("b.PNG", "a.jpg", "c.webp", "d.bmp", "e.jpeg", "._a.png", ".hidden.jpg", "notes.txt", "f.gif"):
        (d / name).write_bytes(b"x")
    (d / "sub.png").mkdir()  # a folder, not an image
    assert [p.name for p in list_images(d)] == ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.jpeg"]
    assert [p.name for p in list_images(d, PNG_SUFFIXES)] == ["b.PNG"]
    with pytest.raises(UserError, match="nothing: folder not found"):
        list_images(tmp_path / "nothing")
    assert list_images(tmp_path / "nothing", not_found=None) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images \(\.png, \.jpg, \.jpeg, \.bmp, \.webp\) in folder"):
        list_images(tmp_path / "empty")
    with pytest.raises(UserError, match="no PNG images in the ground-truth folder"):
        list_images(tmp_path / "empty", PNG_SUFFIXES, empty="no PNG images in the ground-truth folder")
    assert list_images(tmp_path / "empty", empty=None) == []


def test_precision_fp32_is_exact_fp32_on_cuda(monkeypatch):
    """--precision fp32 of the inference commands turns TF32 off (cuDNN allows it by default, as a trainer or
    P5's setup_cuda_fast_math may have); P2's --tf32, set after it, still decides for P2."""
    import common.device
    from common.device import autocast_dtype
    from p2_ddim.infer import setup
    monkeypatch.setattr(common.device, "gpu_has_native_bf16", lambda device=None: True)
    cuda = torch.device("cuda")  # the CUDA branch, on the CPU: only flags are set
    for allowed in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert autocast_dtype(cuda, "fp32") is None
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert autocast_dtype(cuda, "auto") is torch.bfloat16 and autocast_dtype(cuda, "bf16") is torch.bfloat16
        args = argparse.Namespace(device="cpu", precision="fp32", tf32=allowed)
        assert setup(args) == (torch.device("cpu"), None)
        assert torch.backends.cudnn.allow_tf32 is allowed and torch.backends.cuda.matmul.allow_tf32 is allowed
    torch.backends.cudnn.allow_tf32 = True  # torch's default, for the tests after this one


def test_auto_precision_is_fp32_on_gpus_without_native_bf16(monkeypatch):
    """auto = bf16 on Ampere and later; a T4 or V100 (compute capability 7.x) emulates bf16, slower than fp32,
    so auto keeps fp32 there, in the trainers (Lightning) and in inference (autocast) alike."""
    import common.device
    from common.device import autocast_dtype, gpu_has_native_bf16, lightning_precision
    cuda = torch.device("cuda:1")
    for major, native in ((7, False), (8, True), (9, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        assert gpu_has_native_bf16(cuda) is native
        assert lightning_precision("gpu") == ("bf16-mixed" if native else "32-true")
        assert autocast_dtype(cuda) == (torch.bfloat16 if native else None)
        assert lightning_precision("gpu", "bf16") == "bf16-mixed" and autocast_dtype(cuda, "bf16") is torch.bfloat16
    monkeypatch.setattr(common.device.torch.version, "hip", "6.0")  # ROCm: bf16 on every supported GPU
    assert gpu_has_native_bf16(cuda)


def test_lightning_precision_choice(monkeypatch):
    import common.device
    from common.device import lightning_precision
    from common.lightning_utils import devices_and_strategy
    monkeypatch.setattr(common.device, "gpu_has_native_bf16", lambda device=None: True)
    assert lightning_precision("gpu") == "bf16-mixed"
    assert lightning_precision("cpu") == "32-true"
    assert lightning_precision("gpu", "fp32") == "32-true" and lightning_precision("cpu", "bf16") == "bf16-mixed"
    for native in (True, False):  # the CPU-bf16 branch taken on CPUs with and without native bf16
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert lightning_precision("cpu", cpu_native_bf16=True) == ("bf16-mixed" if native else "32-true")
        assert lightning_precision("cpu") == "32-true"
    with pytest.raises(UserError, match="--precision"):
        lightning_precision("cpu", "fp8")
    from common.lightning_utils import resolve_accelerator
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_accelerator("cuda") == "gpu" and resolve_accelerator("auto") == "gpu"  # --device's word too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_accelerator("auto") == "cpu"
    with pytest.raises(UserError, match="--accelerator cuda: CUDA is not available"):
        resolve_accelerator("cuda")
    assert devices_and_strategy("auto") == ("auto", "auto")
    assert devices_and_strategy("1") == (1, "auto") and devices_and_strategy("2") == (2, "ddp")
    with pytest.raises(UserError, match="--devices"):
        devices_and_strategy("two")


@pytest.mark.parametrize("name", ["tpu", "foo", "", "cuda:x", "meta", "cpu:0"])
def test_pick_device_refuses_unknown_devices(name):
    from common.device import pick_device
    with pytest.raises(UserError, match="--device must be one of auto, cpu, cuda, cuda:N, mps"):
        pick_device(name)
    assert pick_device("cpu") == torch.device("cpu")


def test_checkpoint_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    import json
    blobs = set()
    for i in range(8):
        path = save_checkpoint(tmp_path / f"m{i}.safetensors", {"w": torch.ones(2)}, "some.Kind", {"b": 1, "a": 2})
        blobs.add(path.read_bytes())
        assert read_checkpoint(path, "some.Kind")[1] == {"a": 2, "b": 1}
    assert len(blobs) == 1
    blob = blobs.pop()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert list(header["__metadata__"]) == ["config", "kind"]


def test_a_file_given_as_a_folder_is_called_a_file(tmp_path):
    f = tmp_path / "f.png"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="f.png: is a file, not a folder"):
        list_images(f)
    with pytest.raises(UserError, match="nope: folder not found"):
        list_images(tmp_path / "nope")
    with pytest.raises(UserError, match="f.png: is a file, not a folder"):
        CourseImageFolder(f, "mnistm")


# ----------------------------------------------------- write failures, all-or-nothing sets, stale temp files

def test_atomic_path_turns_a_write_failure_into_one_line_and_removes_its_temp(tmp_path, monkeypatch):
    """A full disk (ENOSPC, injected) while writing: one-line UserError naming the file and the error, no temp
    file left; the same through save_png (PIL's write) and write_text_atomic."""
    import errno

    from common.fileio import write_text_atomic
    target = tmp_path / "x.bin"
    with pytest.raises(UserError, match=r"x\.bin: cannot write \(No space left on device\)"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from pathlib import Path
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match=r"3_007\.png: cannot write \(No space left on device\)"):
        save_png(tmp_path / "3_007.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []

    def onto_a_full_device(self, text):  # what a write onto a full disk raises: /dev/full answers ENOSPC
        with open("/dev/full", "w") as f:
            f.write(text)

    monkeypatch.setattr(Path, "write_text", onto_a_full_device)
    with pytest.raises(UserError, match=r"t\.json: cannot write \(No space left on device\)"):
        write_text_atomic(tmp_path / "t.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_probes_by_writing(tmp_path):
    """/proc passes os.access for root but refuses new files: the probe (a temp file created and removed)
    finds it before any work. A writable path is left exactly as it was (nothing created)."""
    import os

    from common.fileio import check_writable, check_writable_file
    if os.geteuid() == 0:
        assert os.access("/proc", os.W_OK | os.X_OK)  # why permission bits are not enough
    with pytest.raises(UserError, match=r"/proc/hw2_out: cannot write here \(/proc: "):
        check_writable("/proc/hw2_out")
    with pytest.raises(UserError, match=r"/proc/scores\.json: cannot write here"):
        check_writable_file("/proc/scores.json")
    with pytest.raises(UserError, match="is a folder"):
        check_writable_file(tmp_path)
    check_writable(tmp_path / "a" / "b")
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_all_or_nothing_adds_nothing_when_it_fails(tmp_path):
    """A failed (or interrupted) block adds no file and no folder, and files that were there stay unchanged;
    a block that ends well writes everything; a nested block joins the outer one."""
    from common.fileio import all_or_nothing, write_text_atomic
    (tmp_path / "old.txt").write_text("before")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with all_or_nothing():
                write_text_atomic(tmp_path / "old.txt", "after")
                write_text_atomic(tmp_path / "new" / "deeper" / "n.txt", "new")
                save_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
                assert not (tmp_path / "a.png").exists()  # nothing lands before the block ends
                raise exc
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
        assert (tmp_path / "old.txt").read_text() == "before"
    with all_or_nothing():
        write_text_atomic(tmp_path / "old.txt", "after")
        with all_or_nothing():
            write_text_atomic(tmp_path / "new" / "n.txt", "new")
        assert not (tmp_path / "new" / "n.txt").exists()
    assert (tmp_path / "old.txt").read_text() == "after" and (tmp_path / "new" / "n.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["n.txt"]


def test_remove_stale_temps_deletes_what_killed_runs_left(tmp_path):
    """Temp files of a process that is gone (kill -9), and the older pattern without a pid, are removed; those
    of a live process, this process's own pending ones and other files stay."""
    import os
    import subprocess
    import sys

    from common.fileio import all_or_nothing, remove_stale_temps, write_text_atomic
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [f".0_001.png.{gone}.ab12cd_3.hw2tmp", ".0_002.png.k2j4h5g6.tmp"]
    keep = [f".0_003.png.{os.getppid()}.zz12cd_3.hw2tmp", "0_004.png", ".hidden", "notes.tmp"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"")
    with all_or_nothing():
        write_text_atomic(tmp_path / "mine.txt", "pending")
        assert remove_stale_temps(tmp_path, tmp_path / "missing") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["mine.txt"])


@pytest.mark.parametrize("script,argv", [
    ("evaluate_digits", ["--folder", "nowhere", "--json", "/proc/scores.json"]),
    ("evaluate_mse", ["--pred", "nowhere", "--gt", "nowhere", "--json", "/proc/scores.json"]),
    ("evaluate_controlnet", ["--pred", "nowhere", "--json", "/proc/scores.json"]),
    ("evaluate_ti", ["--json", "input.json", "--input-dir", "nowhere", "--output-dir", "nowhere", "--clip-weights",
                     "ViT-B-32.pt", "--report", "/proc/scores.json"]),
])
def test_evaluation_scripts_check_their_json_output_first(script, argv, capsys):
    """--json (--report) under /proc passes os.access as root but takes no file: one line, exit 2, before the
    inputs are read or anything is scored."""
    import importlib

    from tests.conftest import run_cli
    main = importlib.import_module(f"scripts.{script}").main
    code, err = run_cli(main, argv, capsys)
    assert code == 2 and "/proc/scores.json: cannot write here" in err and len(err.strip().splitlines()) == 1, err


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert clips a 16-bit grey PNG at 255 (USPS scored 91.7% instead of 96.3% that way): the
    loaders scale it to 8 bits, to the same pixels as the 8-bit file."""
    from common.clip_loading import load_rgb
    from common.datasets import load_image
    eight = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    rgb = load_image(tmp_path / "grey16.png")
    assert rgb.shape == (4, 4, 3) and np.array_equal(rgb[..., 0], eight) and np.array_equal(rgb[..., 2], eight)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "grey16.png"))[..., 1], eight)


@pytest.mark.parametrize("text, said", [("nan", "must be a finite number"), ("-inf", "must be a finite number"),
                                        ("0", "must be > 0"), ("x", "expected a number")])
def test_config_flags_check_their_range_when_parsed(text, said, capsys):
    import argparse
    from dataclasses import dataclass, field

    from common.config import POSITIVE, add_config_flags

    @dataclass(frozen=True)
    class Config:
        lr: float = field(default=0.1, metadata={"range": POSITIVE, "help": "rate"})
        scale: float = field(default=1.0, metadata={"help": "any finite number"})

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Config())
    assert parser.parse_args(["--lr", "1e-3", "--scale", "-2"]).scale == -2
    with pytest.raises(SystemExit):
        parser.parse_args([f"--lr={text}"])
    assert f"argument --lr: {said}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--scale", "nan"])
    assert "argument --scale: must be a finite number" in capsys.readouterr().err


def test_label_csv_refuses_a_name_listed_twice(tmp_path):
    """Scored through a dict, a repeated name would count once, with whichever label came last."""
    f = tmp_path / "pred.csv"
    f.write_text("image_name,label\na.png,1\nb.png,3\na.png,2\n")
    with pytest.raises(UserError, match=r"pred.csv:4: 'a.png' is listed again \(first on line 2\)"):
        read_label_csv(f)


def test_a_training_checkpoint_given_for_weights_says_which_file_to_pass(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, ckpt)
    with pytest.raises(UserError, match="a training checkpoint .for --resume., not the weights; pass the "
                                        "model.safetensors"):
        read_checkpoint(ckpt, "p1_ddpm.ConditionalUNet")


def test_exported_folders_are_readable_by_others(tmp_path):
    """safetensors writes 0600 files: the ControlNet folder a student hands in was unreadable to a grader's
    other account, while every file written through atomic_path had the usual permissions."""
    import os
    import stat

    from diffusers import ControlNetModel

    from p3_controlnet.model import save_controlnet
    from tests.tiny_sd import tiny_sd_components
    umask = os.umask(0)
    os.umask(umask)
    unet = tiny_sd_components(seed=0).unet
    folder = save_controlnet(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 4, 8)),
                             tmp_path / "controlnet")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes == {"controlnet": 0o777 & ~umask, "config.json": 0o666 & ~umask,
                     "diffusion_pytorch_model.safetensors": 0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


def test_resume_auto_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    """--resume with no last.ckpt (a mistyped --out, a first run of a script that always resumes) once started a
    new run without a word."""
    from common.lightning_utils import resolve_resume
    assert resolve_resume("auto", tmp_path) is None
    assert f"no {tmp_path / 'last.ckpt'} yet, so this is a new run" in capsys.readouterr().err
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "last.ckpt") and capsys.readouterr().err == ""
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(UserError, match="nope.ckpt: --resume checkpoint not found"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def test_help_shows_a_default_of_zero():
    """0 == False: a membership test against (None, False) hid --eta 0.0 and --seed 0 from every --help."""
    import argparse

    from common.config import HelpFormatter
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--eta", type=float, default=0.0, help="noise")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--quiet", action="store_true", help="no bars")
    text = " ".join(parser.format_help().split())
    assert "noise (default: 0.0)" in text and "seed (default: 0)" in text
    assert "no bars (default" not in text


def test_pick_device_checks_mps_and_the_cuda_index(monkeypatch):
    """--device mps without MPS was a traceback at the first tensor moved there, and cuda:N past the last GPU
    one deep inside CUDA; both are one line, as --device cuda without CUDA is."""
    from common.device import pick_device
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device mps: MPS .* not available"):
        pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        pick_device("cuda:2")


BOM = b"\xef\xbb\xbf"


def test_json_and_csv_inputs_may_start_with_a_byte_order_mark(tmp_path):
    """Notepad and Excel save UTF-8 with a byte-order mark; strict utf-8 called such a file malformed JSON, and the
    csv header's first name became '\\ufeffimage_name'."""
    from common.fileio import read_json
    (tmp_path / "a.json").write_bytes(BOM + b'{"x": [1, 2]}')
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    (tmp_path / "pred.csv").write_bytes(BOM + b"image_name,label\r\na.png,1\r\nb.png,3\r\n")
    assert read_label_csv(tmp_path / "pred.csv") == [("a.png", 1), ("b.png", 3)]


def test_label_csv_not_utf8_is_one_line(tmp_path):
    (tmp_path / "pred.csv").write_bytes(b"image_name,label\ncaf\xe9.png,1\n")
    with pytest.raises(UserError, match="pred.csv: not UTF-8 text"):
        read_label_csv(tmp_path / "pred.csv")


def test_json_key_given_twice_is_refused(tmp_path):
    """json.loads keeps the last of two equal keys without a word: a concept or an image's labels were lost."""
    from common.fileio import read_json
    (tmp_path / "a.json").write_text('{"0": {"x": 1, "y": 2}, "1": {"x": 3, "x": 4}}')
    with pytest.raises(UserError, match=r"a.json: key 'x' appears twice in one object"):
        read_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('[{"x": 1}, {"x": 2}]')
    assert read_json(tmp_path / "b.json") == [{"x": 1}, {"x": 2}]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_are_read_the_way_their_exif_orientation_says(tmp_path, suffix):
    """A phone stores a portrait photo sideways with EXIF Orientation=6 (turn 90 degrees clockwise to view);
    read as stored, rotated USPS digits scored 27.5% instead of 92.5%."""
    from common.clip_loading import load_rgb
    from common.datasets import load_image
    from p1_ddpm.iclevr_data import load_image as load_iclevr_image
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (250, 0, 0)  # left half red, right half blue, as stored
    stored[:, 32:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))
    # turned clockwise, the stored left (red) half is on top
    for arr in (load_image(path), np.asarray(load_rgb(path))):
        assert arr.shape == (64, 32, 3), arr.shape
        assert arr[8, 16, 0] > 200 > arr[8, 16, 2] and arr[56, 16, 2] > 200 > arr[56, 16, 0]
    square = load_iclevr_image(path)  # resized to 64x64: the halves are now top and bottom
    assert square[8, 32, 0] > 200 > square[8, 32, 2] and square[56, 32, 2] > 200 > square[56, 32, 0]
    # P5's concept photos (decoded once by the data set; resolution 64 keeps this one's size)
    from p5_personalization.train_ti import ConceptImages
    photos = ConceptImages.__new__(ConceptImages)
    photos.resolution = 64
    photo = np.asarray(photos._decode([path])[0])
    assert photo.shape == (64, 32, 3) and photo[8, 16, 0] > 200 > photo[8, 16, 2]


def test_ddp_validation_equals_one_process(tmp_path):
    """Validation under DDP (2 processes) gives the one-process numbers (the mean of 0..4 is 2): every rank reads
    the whole (small) validation set, unpadded; Lightning's DistributedSampler would pad it with repeats to a
    multiple of the world size, so that the logged mean, and P4's choice of best checkpoint, counted some items
    twice (1.67 here)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, child_env
    record = tmp_path / "record.json"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_validation.py"), str(record), "2"],
                       capture_output=True, text=True, timeout=300, env=child_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(record.read_text()) == {"mean": 2.0, "seen": 5}


def test_ema_update_is_the_per_tensor_lerp_and_survives_a_load():
    """EMA.update (one foreach lerp, the count kept as a Python int) gives the bytes of the plain per-tensor
    loop, and a copy loaded from its state_dict mid-way goes on exactly as the original."""
    from common.lightning_utils import EMA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    ema, reference = EMA(model, decay=0.99), [p.detach().clone() for p in model.parameters()]
    resumed = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        for r, p in zip(reference, model.parameters()):
            r.lerp_(p.detach(), 1 - d)
        if resumed is not None:
            resumed.update(model)
        if n == 2:
            resumed = EMA(model, decay=0.99)
            resumed.update(model)  # a count of its own first, which the load must replace
            resumed.load_state_dict(ema.state_dict())
    assert ema.num_updates.item() == 6 and resumed.num_updates.item() == 6
    for r, e, s in zip(reference, ema.module.parameters(), resumed.module.parameters()):
        assert torch.equal(r, e) and torch.equal(e, s)
