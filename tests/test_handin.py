"""Every course year's hand-in scripts (handin/<year>/hw2_{1,2,3}.sh), run as the course runs them.

A student copies their year's three scripts to the top of the repository and the course calls
`bash hw2_N.sh ARGS` with no extra flags. Each test here builds such a repository in tmp_path: the year's
scripts copied to its top, the code folders linked from this repository, and a `checkpoints/` folder of its
own, then runs the scripts from another working directory and checks the layout that year's grader reads.
Weights that the scripts take from the repository are the shipped ones where they are cheap enough (P1 for
2025, 500 images in about 40 s on CPU; DANN), and tiny random ones otherwise (P1 for 2023 and 2024, whose
1000 images would take the shipped model over a minute each: the layouts are what differ between years; the
textual-inversion embeddings and the ControlNet, which do not ship). SD_CKPT and UNET_PT are arguments:
a micro Stable Diffusion (fast at the default 512 px) and P2's width-32 face UNet.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO

YEARS = ("2023", "2024", "2025")
HANDIN = REPO / "handin"
CODE = ("scripts", "common", "assets", "p1_ddpm", "p2_ddim", "p3_controlnet", "p4_dann", "p5_personalization")
SHIPPED = REPO / "checkpoints"


# ------------------------------------------------------------------------------------------------ helpers

def student_repo(tmp_path: Path, year: str, copy: tuple[str, ...] = (), checkpoints: dict[str, Path] | None = None):
    """A hand-in repository: the year's hw2_{1,2,3}.sh at the top beside the named entry points hw2_dann.sh and
    hw2_ti.sh (which 2023's and 2024's hw2_3.sh run), the code folders linked from this repository except those
    in `copy` (copied, so that their `REPO / "checkpoints"` defaults point into this one), and checkpoints/
    holding links named by `checkpoints` to the given files."""
    root = tmp_path / f"student_{year}"
    root.mkdir()
    for n in (1, 2, 3):
        shutil.copy2(HANDIN / year / f"hw2_{n}.sh", root / f"hw2_{n}.sh")
    for name in ("hw2_dann.sh", "hw2_ti.sh"):
        shutil.copy2(REPO / name, root / name)
    for name in CODE:
        if name in copy:
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).symlink_to(REPO / name, target_is_directory=True)
    (root / "checkpoints").mkdir()
    for name, target in (checkpoints or {}).items():
        (root / "checkpoints" / name).symlink_to(target)
    return root


def run_course(root: Path, n: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`bash hw2_N.sh ARGS` from a working directory outside the repository (ARGS relative to it), as the
    course runs it; asserts that it succeeded."""
    cwd = root.parent / "grader"
    cwd.mkdir(exist_ok=True)
    # two threads: the suite runs one test at a time and waits here, so the child has CI's two cores to itself
    # (the shipped P1 model's 1000 images: 100 s on one thread, 72 s on two, the same bytes)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", str(root / f"hw2_{n}.sh"), *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def image_info(path: Path) -> tuple[str, tuple[int, int]]:
    with Image.open(path) as im:
        return im.mode, im.size


def digit_names(digits, count: int) -> list[str]:
    return sorted(f"{d}_{i:03d}.png" for d in digits for i in range(1, count + 1))


def p1_checkpoint(weights: Path) -> dict[str, Path]:
    """checkpoints/p1_ddpm.{safetensors,json} of a student repository, from `weights` and its JSON sidecar."""
    return {"p1_ddpm.safetensors": weights, "p1_ddpm.json": weights.with_suffix(".json")}


# ---------------------------------------------------------------------------------- micro SD, face UNet

# A Stable Diffusion small enough to sample at the scripts' default 512 px on a CPU in seconds: no attention
# outside the UNet's 16x16 middle, 8-16 channels (GroupNorm in groups of 8), a one-layer 16-wide text encoder.
# Written as a diffusers folder, whose configs load_sd reads as they are.
MICRO_UNET = dict(
    block_out_channels=(8, 8, 16), layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
)
MICRO_VAE = dict(
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8, sample_size=512, scaling_factor=0.18215,
)
MICRO_TEXT = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
    vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


@pytest.fixture(scope="module")
def micro_sd(tmp_path_factory):
    """(diffusers folder, its components)."""
    from common.sd_export import build_sd_components, write_diffusers_folder
    comps = build_sd_components(MICRO_UNET, MICRO_VAE, MICRO_TEXT, seed=0, name="micro")
    return write_diffusers_folder(comps, tmp_path_factory.mktemp("sd") / "sd-micro"), comps


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> Path:
    from tests.test_p2_ddim import write_face_dir
    return write_face_dir(tmp_path_factory.mktemp("face"), count=2, seed=3)


# ------------------------------------------------------------------------------------- the scripts

def test_top_level_hw2_scripts_are_the_2025_ones():
    for n in (1, 2, 3):
        assert (REPO / f"hw2_{n}.sh").read_bytes() == (HANDIN / "2025" / f"hw2_{n}.sh").read_bytes(), n
    for year in YEARS:
        for n in (1, 2, 3):
            script = HANDIN / year / f"hw2_{n}.sh"
            assert os.access(script, os.X_OK), script
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_handin_hw2_scripts_check_their_arguments_and_place(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    for year in YEARS:
        for n in (1, 2, 3):
            r = subprocess.run(["bash", str(HANDIN / year / f"hw2_{n}.sh")], capture_output=True, text=True, env=env)
            assert r.returncode == 2 and r.stderr.startswith(f"usage: bash hw2_{n}.sh "), (year, n, r.stderr)
    # --help (or -h) alone is the usage, exit 0; hw2_1.sh once took it for OUT_DIR
    for script in sorted(REPO.glob("hw2_*.sh")) + sorted(HANDIN.glob("*/hw2_*.sh")):
        for flag in ("--help", "-h"):
            r = subprocess.run(["bash", str(script), flag], capture_output=True, text=True, env=env)
            assert r.returncode == 0 and r.stdout.startswith(f"usage: bash {script.name} "), (script, r.stderr)
    # outside a repository it says so, in one line, instead of a bash error about a missing file
    alone = tmp_path / "hw2_1.sh"
    shutil.copy2(HANDIN / "2025" / "hw2_1.sh", alone)
    r = subprocess.run(["bash", str(alone), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "scripts/python_env.sh not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_hw2_entry_points_run_through_a_symlink(tmp_path):
    """`ln -s REPO/hw2_dann.sh . && bash hw2_dann.sh ...`: the scripts looked for the repository beside the link.
    Each link here (one of them a relative link to a link) reaches its infer.py's --help; and again with a
    readlink that lacks -f (older macOS), where the scripts follow the links themselves."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    links = tmp_path / "links"
    links.mkdir()
    for name in ("hw2_dann.sh", "hw2_ti.sh", "hw2_1.sh"):
        (links / name).symlink_to(REPO / name)
    (links / "handin_2023_hw2_3.sh").symlink_to(HANDIN / "2023" / "hw2_3.sh")
    (links / "again_hw2_1.sh").symlink_to("hw2_1.sh")
    no_f = tmp_path / "bin"
    no_f.mkdir()
    real = shutil.which("readlink")
    (no_f / "readlink").write_text(f'#!/bin/sh\n[ "$1" = -f ] && exit 1\nexec {real} "$@"\n')
    (no_f / "readlink").chmod(0o755)
    calls = (("hw2_dann.sh", "x", "--help"), ("handin_2023_hw2_3.sh", "x", "--help"),
             ("hw2_1.sh", "out", "--help"), ("again_hw2_1.sh", "out", "--help"))
    for path, some in ((env["PATH"], calls), (f"{no_f}:{env['PATH']}", calls[::3])):
        for name, *args in some:
            r = subprocess.run(["bash", name, *args], cwd=links, capture_output=True, text=True,
                               env=dict(env, PATH=path))
            assert r.returncode == 0 and "usage:" in r.stdout, (name, path, r.stderr[-2000:])


def test_hw2_ti_takes_a_single_dash_flag_as_a_flag(tmp_path):
    """EMBEDDINGS_DIR is the first extra argument only when it has no leading dash, as hw2_3.sh's CONTROLNET:
    `-h` was taken for the embeddings folder."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(REPO / "hw2_ti.sh"), "in.json", str(tmp_path / "out"), "sd.ckpt", "-h"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "usage:" in r.stdout and "--embeddings" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------------------- problem 1

@pytest.mark.parametrize("year", YEARS)
def test_hw2_1_as_the_course_runs_it(year, tiny_p1_checkpoint, tmp_path):
    # the shipped model for the latest year only, to keep the suite short; the same code samples every layout
    weights = SHIPPED / "p1_ddpm.safetensors" if year == YEARS[-1] else tiny_p1_checkpoint
    root = student_repo(tmp_path, year, copy=("p1_ddpm",), checkpoints=p1_checkpoint(weights))
    run_course(root, 1, "out")
    out = root.parent / "grader" / "out"
    if year == "2023":  # one flat folder; the grader reads the label from the name's first character
        assert sorted(os.listdir(out)) == digit_names(range(10), 100)
        files = [out / "0_001.png", out / "9_100.png"]
    elif year == "2024":
        assert sorted(os.listdir(out)) == ["mnistm", "svhn"]
        for name in ("mnistm", "svhn"):
            assert sorted(os.listdir(out / name)) == digit_names(range(10), 50)
        files = [out / "mnistm" / "0_001.png", out / "svhn" / "9_050.png"]
    else:  # even digits MNIST-M, odd digits SVHN
        assert sorted(os.listdir(out)) == ["mnistm", "svhn"]
        assert sorted(os.listdir(out / "mnistm")) == digit_names(range(0, 10, 2), 50)
        assert sorted(os.listdir(out / "svhn")) == digit_names(range(1, 10, 2), 50)
        files = [out / "mnistm" / "8_050.png", out / "svhn" / "1_001.png"]
    for f in files:
        assert image_info(f) == ("RGB", (28, 28)), f


def test_handin_hw2_1_forwards_extra_flags_in_place(tiny_p1_checkpoint, tmp_path):
    """Run from handin/<year>/ itself (the root is two levels up), with flags the course never passes (2024's
    is run this way in test_p1_ddpm)."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    counts = {}
    for year in ("2023", "2025"):
        out = tmp_path / year
        r = subprocess.run(["bash", str(HANDIN / year / "hw2_1.sh"), str(out), "--checkpoint", str(tiny_p1_checkpoint),
                            "--steps", "1", "--quiet"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"({year} layout, dpmpp2m 1 steps" in r.stdout
        counts[year] = {str(p.relative_to(out).parent) for p in out.rglob("*.png")}
    assert counts == {"2023": {"."}, "2025": {"mnistm", "svhn"}}


# ------------------------------------------------------------------------------------- problem 2

@pytest.mark.parametrize("year", YEARS)
def test_hw2_2_as_the_course_runs_it(year, face, tmp_path):
    root = student_repo(tmp_path, year)
    run_course(root, 2, str(face / "noise"), "out", str(face / "UNet.pt"))
    out = root.parent / "grader" / "out"
    assert sorted(os.listdir(out)) == ["00.png", "01.png"]  # one PNG per noise, named after it
    for f in out.iterdir():
        assert image_info(f) == ("RGB", (64, 64))


# ------------------------------------------------------------------------------------- problem 3

def test_hw2_3_2023_dann_as_the_course_runs_it(tmp_path):
    root = student_repo(tmp_path, "2023", copy=("p4_dann",), checkpoints={
        f"p4_dann_usps.{ext}": SHIPPED / f"p4_dann_usps.{ext}" for ext in ("safetensors", "json")})
    # the course's folder: the target domain is read from its path
    data = tmp_path / "hw2_data" / "digits" / "usps" / "data"
    shutil.copytree(REPO / "assets" / "p4" / "usps", data)
    run_course(root, 3, str(data), "pred.csv")
    with open(root.parent / "grader" / "pred.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_name", "label"]
    assert sorted(r[0] for r in rows[1:]) == sorted(os.listdir(data)) and len(rows) == 1 + len(os.listdir(data))
    assert all(r[1] in {str(d) for d in range(10)} for r in rows[1:])
    with open(REPO / "assets" / "p4" / "usps_labels.csv", newline="") as f:
        truth = {r["image_name"]: r["label"] for r in csv.DictReader(f)}
    correct = sum(truth[name] == label for name, label in rows[1:])
    assert correct >= 8, rows  # the shipped model scores 97% on 600 USPS images


def test_hw2_3_2024_textual_inversion_as_the_course_runs_it(micro_sd, tmp_path):
    from p5_personalization.infer_ti import find_embeddings
    from p5_personalization.textual_inversion import save_embedding
    sd_path, comps = micro_sd
    root = student_repo(tmp_path, "2024")
    emb = root / "checkpoints" / "textual_inversion"
    emb.mkdir()
    dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
    save_embedding(emb / "new1.safetensors", "<new1>", torch.randn(1, dim) * 0.1, {})
    assert find_embeddings(emb, ["<new1>"]) == {"<new1>": emb / "new1.safetensors"}  # where infer_ti looks
    js = tmp_path / "grader" / "input.json"
    js.parent.mkdir()
    js.write_text(json.dumps({"0": {"src_image": "dog", "token_name": "<new1>", "prompt": ["a <new1> on the grass"],
                                    "prompt_4_clip_eval": ["a dog on the grass"], "baseline": [[60, 30]]}}))
    run_course(root, 3, "input.json", "out", str(sd_path))
    out = root.parent / "grader" / "out"
    found = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    assert found == {f"0/0/source0_prompt0_{k}.png" for k in range(25)}  # the course's tree, 25 per prompt
    assert image_info(out / "0" / "0" / "source0_prompt0_24.png") == ("RGB", (512, 512))


def test_hw2_3_2025_controlnet_as_the_course_runs_it(micro_sd, tmp_path):
    from diffusers import ControlNetModel

    from common.sd_export import randomise_zeros
    from p3_controlnet.model import save_controlnet
    sd_path, comps = micro_sd
    root = student_repo(tmp_path, "2025")
    # as build_controlnet makes one, with a narrower conditioning encoder (it runs at 512 px, every step): any
    # diffusers ControlNet folder loads. Three stride-2 convs bring the control image to the latents' 1/8.
    net = ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=(4, 4, 4, 8))
    randomise_zeros(net, torch.Generator().manual_seed(0))  # so that the control image does steer the UNet
    save_controlnet(net, root / "checkpoints" / "controlnet")
    grader = tmp_path / "grader"
    (grader / "source").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(("red", "blue")):
        control = np.zeros((64, 64, 3), np.uint8)
        control[16:48, 16:48] = 255
        Image.fromarray(control).save(grader / "source" / f"{i}.png")
        lines.append({"source": f"{i}.png", "target": f"{i}.png", "prompt": f"{colour} square, white background"})
    (grader / "prompt.json").write_text("".join(json.dumps(d) + "\n" for d in lines))
    run_course(root, 3, "prompt.json", "source", "out", str(sd_path))
    out = grader / "out"
    assert sorted(os.listdir(out)) == ["0.png", "1.png"]  # one image per prompt line, named by its target
    for f in out.iterdir():
        assert image_info(f) == ("RGB", (512, 512))


def test_handin_hw2_3_forward_their_optional_arguments(tmp_path):
    """The weights folder as an optional positional argument (2024, 2025) and flags (2023), which the course
    never passes: a missing folder is reported by name, before any model is loaded."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    js = tmp_path / "input.json"
    js.write_text(json.dumps({"0": {"src_image": "dog", "token_name": "<new1>", "prompt": ["a <new1>"]}}))
    missing = tmp_path / "no_such_weights"
    r = subprocess.run(["bash", str(HANDIN / "2024" / "hw2_3.sh"), str(js), str(tmp_path / "o"), "sd-v1-4.ckpt",
                        str(missing), "--steps", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr
    (tmp_path / "source").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "source" / "0.png")
    prompts = tmp_path / "prompt.json"
    prompts.write_text(json.dumps({"source": "0.png", "target": "0.png", "prompt": "a square"}) + "\n")
    r = subprocess.run(["bash", str(HANDIN / "2025" / "hw2_3.sh"), str(prompts), str(tmp_path / "source"),
                        str(tmp_path / "o"), "sd-v1-4.ckpt", str(missing), "--steps", "1"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    # a folder whose path names no domain: --target says
    data = tmp_path / "digits"
    shutil.copytree(REPO / "assets" / "p4" / "usps", data)
    r = subprocess.run(["bash", str(HANDIN / "2023" / "hw2_3.sh"), str(data), str(tmp_path / "p.csv"), "--target",
                        "usps"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + len(os.listdir(data))


def test_hw2_3_2025_checks_every_control_image_before_loading_a_model(micro_sd, tmp_path):
    """The course's call with a truncated 10th control image (the default batch is 8): exit 2 naming the image,
    before SD or the ControlNet is loaded (SD_CKPT here is not even a file), and nothing added to OUT_DIR."""
    from diffusers import ControlNetModel

    from p3_controlnet.model import save_controlnet
    _, comps = micro_sd
    root = student_repo(tmp_path, "2025")
    save_controlnet(ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=(4, 4, 4, 8)),
                    root / "checkpoints" / "controlnet")
    grader = tmp_path / "grader"
    (grader / "source").mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (64, 64), (255, 0, 0)).save(grader / "source" / f"{i}.png")
    whole = (grader / "source" / "9.png").read_bytes()
    (grader / "source" / "9.png").write_bytes(whole[: len(whole) // 2])
    (grader / "prompt.json").write_text("".join(
        json.dumps({"source": f"{i}.png", "target": f"{i}.png", "prompt": "red square"}) + "\n" for i in range(10)))
    (grader / "out").mkdir()
    (grader / "out" / "keep.txt").write_text("there before")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(root / "hw2_3.sh"), "prompt.json", "source", "out", "no-sd-v1-4.ckpt"],
                       cwd=grader, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "9.png: not a readable image" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(grader / "out") == ["keep.txt"]
