"""P3: ControlNet on a frozen (tiny, random) Stable Diffusion; Fill50k generator; hw2_3.sh end to end; bad inputs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from tests.conftest import REPO, SHARED, plant_nan, run_cli
from tests.tiny_sd import TINY_IMAGE, tiny_sd_components, write_tiny_sd

SIZE = TINY_IMAGE  # 64 px images, 8x8 latents


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    from p3_controlnet.make_fill50k import main
    out = tmp_path_factory.mktemp("fill50k")
    main(["--out", str(out), "--n", "12", "--n-test", "3", "--size", str(SIZE), "--seed", "5"])
    return out


@pytest.fixture(scope="module")
def sd_ckpt(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"), "ldm", seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fill, sd_ckpt):
    """A 2-step training run (in process), its output folder."""
    from p3_controlnet.train import main
    out = tmp_path_factory.mktemp("run")
    main(["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--size", str(SIZE), "--max-steps", "2",
          "--batch-size", "2", "--sample-every", "2", "--sample-steps", "2", "--val-count", "2", "--num-workers", "0",
          "--lr", "1e-3", "--proportion-empty-prompts", "0.5", "--quiet"])
    return out


# ------------------------------------------------------------------------------------------------ model

def test_controlnet_at_init_leaves_unet_output_unchanged():
    from p3_controlnet.model import ControlledUNet, build_controlnet
    sd = tiny_sd_components(seed=2)
    net = ControlledUNet(sd.unet, build_controlnet(sd.unet, sd.vae_scale_factor)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    ctx = torch.randn(2, 77, sd.unet.config.cross_attention_dim)
    control = torch.rand(2, 3, SIZE, SIZE)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        plain = sd.unet(x, t, encoder_hidden_states=ctx).sample
        steered = net(x, t, ctx, control)
        residuals = net.residuals(x, t, ctx, control)
    assert torch.equal(plain, steered)
    assert all(r.abs().max() == 0 for r in residuals["down_block_additional_residuals"])
    # the copy is real: the ControlNet's encoder holds the UNet's weights
    assert torch.equal(net.controlnet.conv_in.weight, sd.unet.conv_in.weight)
    # and the residual path is live: non-zero zero-convs change the output
    with torch.no_grad():
        for p in net.controlnet.controlnet_down_blocks.parameters():
            p.normal_(0, 0.1)
        assert not torch.allclose(net(x, t, ctx, control), plain)


def test_one_training_step_changes_controlnet_only(fill):
    from p3_controlnet.data import Fill50kDataModule
    from p3_controlnet.train import ControlNetModule, P3TrainConfig
    sd = tiny_sd_components(seed=2)
    data = Fill50kDataModule(fill, SIZE, batch_size=4, val_count=2)
    module = ControlNetModule(sd=sd, prompts=data.prompts, empty_prompt_id=data.empty_prompt_id,
                              config=P3TrainConfig(lr=1e-3, gradient_checkpointing=True))
    module.cache_text_embeddings()
    assert module.text_encoder is None and module.text_cache.shape[:2] == (len(data.prompts), 77)
    frozen = {f"{n}.{k}": v.clone() for n, m in (("unet", module.net.unet), ("vae", module.vae))
              for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in module.net.controlnet.state_dict().items()}
    batch = next(iter(data.train_dataloader()))
    opt = module.configure_optimizers()
    module.train()
    torch.manual_seed(0)
    loss = module.diffusion_loss(batch, drop_prompts=True)
    loss.backward()
    assert all(p.grad is None for p in module.net.unet.parameters())
    assert all(p.grad is None for p in module.vae.parameters())
    opt.step()
    after_frozen = {
        f"{n}.{k}": v for n, m in (("unet", module.net.unet), ("vae", module.vae)) for k, v in m.state_dict().items()
    }
    assert all(torch.equal(frozen[k], after_frozen[k]) for k in frozen)
    after = module.net.controlnet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert any(k.startswith("controlnet_mid_block") for k in changed)
    assert not module.net.unet.training and module.net.controlnet.training


def test_loss_targets_what_the_sds_unet_predicts(fill, monkeypatch):
    """A v-prediction SD's ControlNet is trained on v (its scheduler says so), SD v1's on the noise: the loss is
    the mean squared error between the controlled UNet's output and common.schedules.training_target."""
    from diffusers import DDPMScheduler

    import p3_controlnet.train as train
    from p3_controlnet.data import Fill50kDataModule
    data = Fill50kDataModule(fill, SIZE, batch_size=2, val_count=2)
    batch = next(iter(data.train_dataloader()))
    seen, training_target = [], train.training_target

    def recording(x0, noise, ab, prediction):
        seen.append(prediction)
        return training_target(x0, noise, ab, prediction)

    monkeypatch.setattr(train, "training_target", recording)
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        sd = tiny_sd_components(seed=2)
        sd.noise_scheduler = DDPMScheduler.from_config({**sd.noise_scheduler.config, "prediction_type": kind})
        module = train.ControlNetModule(sd=sd, prompts=data.prompts, empty_prompt_id=data.empty_prompt_id)
        module.cache_text_embeddings()
        with torch.no_grad():
            losses[kind] = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    assert seen == ["eps", "v"] and not torch.equal(losses["epsilon"], losses["v_prediction"])


def test_fit_writes_controlnet_samples_and_resumes(trained, fill, sd_ckpt, capsys):
    from p3_controlnet.model import load_controlnet
    from p3_controlnet.train import main
    first = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 2
    assert all(k.startswith("net.controlnet.") for k in first["state_dict"])  # SD itself is not saved
    assert (trained / "samples" / "step_000002.png").is_file()
    net = load_controlnet(trained / "controlnet")
    saved = {k: v for k, v in first["state_dict"].items()}
    assert torch.equal(net.state_dict()["conv_in.weight"], saved["net.controlnet.conv_in.weight"])
    assert net.controlnet_down_blocks[0].weight.abs().max() > 0  # trained away from zero
    # the folder says how and how far it was trained (it once held only diffusers' config.json)
    info = json.loads((trained / "controlnet" / "train.json").read_text())
    assert info["global_step"] == 2 and info["train"]["batch_size"] == 2 and info["seed"] == 0
    assert info["sd"] == str(sd_ckpt.resolve()) and info["program"] == "p3_controlnet/train.py"
    code, err = run_cli(main, ["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(trained), "--size", str(SIZE),
                               "--max-steps", "3", "--batch-size", "2", "--sample-every", "2", "--sample-steps", "0",
                               "--val-count", "2", "--num-workers", "0", "--lr", "1e-3", "--resume", "--quiet"], capsys)
    assert code == 0, err
    second = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 3
    w2 = second["state_dict"]["net.controlnet.controlnet_mid_block.weight"]
    assert not torch.equal(w2, first["state_dict"]["net.controlnet.controlnet_mid_block.weight"])


# ------------------------------------------------------------------------------------------- inference

def _read(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im.convert("RGB"))


def test_hw2_3_end_to_end(trained, fill, sd_ckpt, tmp_path, capsys):
    prompts = fill / "testing" / "prompt.json"
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    # targets in the course file are "<i>.png"; rename them here so a mix-up with the source names shows
    renamed = tmp_path / "prompt.json"
    renamed.write_text("".join(json.dumps({**d, "target": f"out_{d['target']}"}) + "\n" for d in lines))
    out = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "hw2_3.sh"), str(renamed), str(fill / "testing" / "source"), str(out),
                        str(sd_ckpt), str(trained / "controlnet"), "--size", str(SIZE), "--steps", "2",
                        "--batch-size", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == sorted(f"out_{d['target']}" for d in lines)
    images = {}
    for f in files:
        mode, size, arr = _read(out / f)
        assert mode == "RGB" and size == (SIZE, SIZE)
        images[f] = arr
    assert not np.array_equal(images[files[0]], images[files[1]])  # seed + line index: different noise
    # the same images whatever the batch size (line i always starts from seed 42 + i)
    from p3_controlnet.infer import main
    out1 = tmp_path / "gen_b1"
    code, err = run_cli(main, ["--prompts", str(renamed), "--source-dir", str(fill / "testing" / "source"),
                               "--out", str(out1), "--sd", str(sd_ckpt), "--controlnet", str(trained / "controlnet"),
                               "--size", str(SIZE), "--steps", "2", "--batch-size", "1", "--quiet"], capsys)
    assert code == 0, err
    for f in files:
        diff = np.abs(_read(out1 / f)[2].astype(int) - images[f].astype(int)).max()
        assert diff <= 1, f
    # the CUDA default (bf16 autocast, UNet and VAE in bf16, the text encoder fp32), on the CPU
    out_bf16 = tmp_path / "gen_bf16"
    code, err = run_cli(main, ["--prompts", str(renamed), "--source-dir", str(fill / "testing" / "source"),
                               "--out", str(out_bf16), "--sd", str(sd_ckpt), "--controlnet",
                               str(trained / "controlnet"), "--size", str(SIZE), "--steps", "2", "--quiet",
                               "--precision", "bf16"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out_bf16)) == files
    assert all(_read(out_bf16 / f)[1] == (SIZE, SIZE) for f in files)


def test_default_controlnet_missing_says_how_to_get_one(monkeypatch, tmp_path, fill, sd_ckpt, capsys):
    import p3_controlnet.infer as infer
    import p3_controlnet.model as model
    monkeypatch.setattr(model, "DEFAULT_CONTROLNET", tmp_path / "checkpoints" / "controlnet")
    monkeypatch.setattr(infer, "DEFAULT_CONTROLNET", tmp_path / "checkpoints" / "controlnet")
    out = tmp_path / "gen"
    code, err = run_cli(infer.main, ["--prompts", str(fill / "testing" / "prompt.json"), "--source-dir",
                                     str(fill / "testing" / "source"), "--out", str(out), "--sd", str(sd_ckpt)], capsys)
    assert code == 2
    assert "no trained ControlNet" in err and "p3_controlnet/train.py" in err and "5th argument" in err
    assert not out.exists()


def test_controlnet_with_non_finite_weights_is_refused(trained, fill, sd_ckpt, tmp_path, capsys):
    """A ControlNet folder saved from a diverged run (a NaN in its weights): one line naming the file, exit 2,
    no output folder, instead of black images."""
    import p3_controlnet.infer as infer
    bad = tmp_path / "controlnet"
    shutil.copytree(trained / "controlnet", bad)
    (weights,) = bad.glob("*.safetensors")
    name = plant_nan(weights)
    out = tmp_path / "gen"
    code, err = run_cli(infer.main, ["--prompts", str(fill / "testing" / "prompt.json"), "--source-dir",
                                     str(fill / "testing" / "source"), "--out", str(out), "--sd", str(sd_ckpt),
                                     "--controlnet", str(bad), "--size", str(SIZE), "--steps", "1"], capsys)
    assert code == 2 and f"{weights}: tensor {name!r} contains NaN or infinity" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_folder_that_is_not_a_controlnet_names_controlnet_not_sd(trained, fill, sd_ckpt, tmp_path, capsys):
    """A UNet folder given as --controlnet (a diffusers folder, but not a ControlNet): the error once said what
    --sd takes."""
    import p3_controlnet.infer as infer
    from tests.tiny_sd import tiny_sd_components
    unet_dir = tmp_path / "unet"
    tiny_sd_components(seed=0).unet.save_pretrained(unet_dir)
    (unet_dir / "config.json").write_text((trained / "controlnet" / "config.json").read_text())
    out = tmp_path / "gen"
    code, err = run_cli(infer.main, ["--prompts", str(fill / "testing" / "prompt.json"), "--source-dir",
                                     str(fill / "testing" / "source"), "--out", str(out), "--sd", str(sd_ckpt),
                                     "--controlnet", str(unet_dir), "--size", str(SIZE), "--steps", "1"], capsys)
    assert code == 2 and "weights do not fit a ControlNet" in err and "--controlnet takes the folder" in err, err
    assert "--sd takes" not in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_report_two_circles(trained, sd_ckpt, tmp_path, capsys):
    from p3_controlnet.report import PROMPTS, main
    out = tmp_path / "report.png"
    code, err = run_cli(main, ["--sd", str(sd_ckpt), "--controlnet", str(trained / "controlnet"), "--out", str(out),
                               "--size", str(SIZE), "--steps", "2"], capsys)
    assert code == 0, err
    assert len(PROMPTS) == 2 and "red circle and a blue circle" in PROMPTS[0]
    with Image.open(out) as im:
        assert im.width > 3 * SIZE  # control + two generated
    control = np.asarray(Image.open(tmp_path / "report_control.png").convert("L"))
    assert control.shape == (SIZE, SIZE) and (control > 128).sum() > 0


# ------------------------------------------------------------------------------------------- generator

def test_fill50k_generator_layout_and_colours(fill):
    from p3_controlnet.make_fill50k import named_colours
    rgb = dict(named_colours())
    for split, n in (("training", 12), ("testing", 3)):
        root = fill / split
        lines = [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]
        assert len(lines) == n and sorted(os.listdir(root / "source")) == sorted(d["source"] for d in lines)
        for d in lines:
            circle, background = re.fullmatch(r"(.+) circle with (.+) background", d["prompt"]).groups()
            src = np.asarray(Image.open(root / "source" / d["source"]))
            tgt = np.asarray(Image.open(root / "target" / d["target"]))
            assert src.shape == tgt.shape == (SIZE, SIZE, 3)
            assert tuple(tgt[0, 0]) == rgb[background] and tuple(tgt[-1, -1]) == rgb[background]
            # the outline is white on black and encloses pixels of the circle colour
            outline = (src == 255).all(-1)
            assert outline.any() and ((src == 0).all(-1) | outline).mean() > 0.9
            ys, xs = np.nonzero(outline)
            cy, cx = int(round(ys.mean())), int(round(xs.mean()))
            assert tuple(tgt[cy, cx]) == rgb[circle]
    training = (fill / "training" / "prompt.json").read_text()
    assert training != (fill / "testing" / "prompt.json").read_text()


def test_generator_is_deterministic_and_names_match_course_prompts(tmp_path):
    from p3_controlnet.make_fill50k import main, named_colours, split_colour_name
    for k in (1, 2):
        main(["--out", str(tmp_path / f"d{k}"), "--n", "3", "--size", "32", "--seed", "9"])
    a, b = tmp_path / "d1" / "training", tmp_path / "d2" / "training"
    assert (a / "prompt.json").read_bytes() == (b / "prompt.json").read_bytes()
    assert (a / "target" / "2.png").read_bytes() == (b / "target" / "2.png").read_bytes()
    assert split_colour_name("lightgoldenrodyellow") == "light golden rod yellow"
    assert split_colour_name("mediumaquamarine") == "medium aquamarine"
    course = SHARED / "dlcv" / "fill50k_testing_prompt.json"
    if course.is_file():  # every colour of the course's test prompts is one the generator can draw
        names = {n for n, _ in named_colours()}
        for line in course.read_text().splitlines():
            circle, background = re.fullmatch(r"(.+) circle with (.+) background", json.loads(line)["prompt"]).groups()
            assert circle in names and background in names


def _mini_samples(count: int, size: int = 48, seed: int = 3, **overrides):
    import dataclasses

    from p3_controlnet.make_fill50k import PRESET_OPTIONS, draw_sample, palette_colours
    options = dataclasses.replace(PRESET_OPTIONS["mini"], **overrides)
    colours = palette_colours(options.palette)
    return [draw_sample(np.random.default_rng([seed, i]), size, colours, options) for i in range(count)]


def test_fill50k_default_draw_is_the_original():
    """The options default to the original Fill50k: these pixels and prompts are those the generator drew
    before the options existed."""
    import hashlib

    from p3_controlnet.make_fill50k import draw_sample, named_colours
    h = hashlib.sha256()
    for i in range(8):
        source, target, prompt, _ = draw_sample(np.random.default_rng([4, i]), 48, named_colours())
        h.update(source.tobytes())
        h.update(target.tobytes())
        h.update(prompt.encode())
    assert h.hexdigest() == "c6c4d2962803f8466198689646255923e4468f5422a85301c1c2baf9a282b27c"


def test_fill50k_mini_preset_captions_circles_and_unnamed_colour():
    from scipy import ndimage

    from p3_controlnet.make_fill50k import BASIC_PALETTE, caption
    samples = _mini_samples(400)
    names = set(BASIC_PALETTE) - {"chartreuse"}
    colour = "(?:" + "|".join(sorted(names)) + ") "
    grammar = re.compile(rf"(?:(?:an? )?(?:{colour})?circle(?: and (?:an? )?(?:{colour})?circle)?|two circles)"
                         rf" with ({'|'.join(sorted(names))}) background\.?")
    counts = {"circles": [], "chartreuse": 0, "styled": 0, "omitted": 0, "forms": set()}
    for source, target, prompt, record in samples:
        assert "chartreuse" not in prompt and grammar.fullmatch(prompt), prompt
        circles = record["circles"]
        counts["circles"].append(len(circles))
        used = [c["colour"] for c in circles] + [record["background"]]
        assert len(set(used)) == len(used) and record["background"] != "chartreuse"
        if len(circles) == 2:
            a, b = circles
            assert a["cx"] <= b["cx"]  # named left to right
            assert np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) >= a["r"] + b["r"] + 48 / 32 + 2 - 0.02
        # the outlines in the control do not touch, not even diagonally: one connected outline per circle
        assert ndimage.label((source == 255).all(-1), structure=np.ones((3, 3)))[1] == len(circles)
        # each circle the caption names is named in order; chartreuse ones never
        said = [None if c["colour"] == "chartreuse" else c["colour"] for c in circles]
        forms = {caption(said, record["background"], f) for f in range(4)}
        if prompt not in forms:
            counts["omitted"] += 1
            assert prompt in {caption([None] * len(circles), record["background"], f) for f in range(4)}
        counts["forms"].add((prompt.startswith(("a ", "an ")), prompt.endswith(".")))
        counts["chartreuse"] += any(c["colour"] == "chartreuse" for c in circles)
        counts["styled"] += record["style"] == "stripes"
        # the pixels: background colour in a corner, each circle's colour at its centre (stripes start at
        # band 1, so the top band of a striped circle keeps its colour too)
        assert tuple(target[0, 0]) == ImageColor.getrgb(record["background"])
        for c in circles:
            rgb = ImageColor.getrgb(c["colour"])
            y = int(c["cy"]) if record["style"] == "plain" else int(c["cy"] - c["r"]) + 1
            y = min(max(y, 0), 47)
            if record["style"] == "plain" or (y % 6) < 3:
                assert tuple(target[y, int(c["cx"])]) == rgb
    assert set(counts["circles"]) == {1, 2} and 0.35 < np.mean(np.array(counts["circles"]) == 2) < 0.65
    assert counts["chartreuse"] > 20 and 20 < counts["styled"] < 70 and 20 < counts["omitted"] < 150
    assert len(counts["forms"]) == 4


def test_fill50k_options_are_deterministic_and_recorded(tmp_path, capsys):
    from p3_controlnet.make_fill50k import main
    args = ["--n", "6", "--size", "32", "--seed", "2", "--preset", "mini"]
    for k in (1, 2):
        main(["--out", str(tmp_path / f"d{k}")] + args)
    a, b = tmp_path / "d1" / "training", tmp_path / "d2" / "training"
    assert (a / "prompt.json").read_bytes() == (b / "prompt.json").read_bytes()
    for i in range(6):
        for sub in ("source", "target"):
            assert np.array_equal(np.asarray(Image.open(a / sub / f"{i}.png")),
                                  np.asarray(Image.open(b / sub / f"{i}.png")))
    line = json.loads((a / "prompt.json").read_text().splitlines()[0])
    assert set(line) == {"source", "target", "prompt", "circles", "background", "style"}
    # a single option changes what is drawn; the original layout (no extra keys) only without any
    main(["--out", str(tmp_path / "d3"), "--n", "2", "--size", "32", "--max-circles", "2"])
    assert "circles" in (tmp_path / "d3" / "training" / "prompt.json").read_text()
    main(["--out", str(tmp_path / "d4"), "--n", "2", "--size", "32"])
    assert "circles" not in (tmp_path / "d4" / "training" / "prompt.json").read_text()
    capsys.readouterr()
    code, err = run_cli(main, ["--out", str(tmp_path / "d5"), "--n", "2", "--unnamed-colour", "chartreux"], capsys)
    assert code == 2 and "--unnamed-colour 'chartreux' is not in the css palette" in err
    code, err = run_cli(main, ["--out", str(tmp_path / "d5"), "--n", "2", "--max-circles", "3"], capsys)
    assert code == 2 and "--max-circles must be 1 or 2" in err
    code, err = run_cli(main, ["--out", str(tmp_path / "d5"), "--n", "2", "--omit-colour", "1.5"], capsys)
    assert code == 2 and "--omit-colour must be in [0, 1]" in err and not (tmp_path / "d5").exists()


def test_fill50k_ring_style_and_basic_palette_distances():
    from common.colour import rgb255_to_lab
    from p3_controlnet.make_fill50k import BASIC_PALETTE
    lab = rgb255_to_lab([ImageColor.getrgb(n) for n in BASIC_PALETTE])
    d = torch.cdist(lab, lab) + torch.eye(len(BASIC_PALETTE)) * 1e3
    assert 34 < float(d.min()) < 36  # navy and purple, the closest pair the docstring names
    for _, target, _, record in _mini_samples(60, style="ring", style_share=1.0):
        assert record["style"] == "ring"
        for c in record["circles"]:
            centre = tuple(target[int(c["cy"]), int(c["cx"])])
            assert centre == ImageColor.getrgb(record["background"])  # a ring: the middle shows the background


# ------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs(tmp_path, fill, sd_ckpt, trained, capsys):
    from p3_controlnet.infer import main as infer
    from p3_controlnet.make_fill50k import main as make
    from p3_controlnet.train import main as train
    src = str(fill / "testing" / "source")
    base = ["--source-dir", src, "--sd", str(sd_ckpt), "--controlnet", str(trained / "controlnet"), "--size", str(SIZE)]

    bad = tmp_path / "bad.json"
    bad.write_text('{"source": "0.png", "target": "0.png", "prompt": "red circle with blue background"}\nnot json\n')
    code, err = run_cli(infer, ["--prompts", str(bad), "--out", str(tmp_path / "o1")] + base, capsys)
    assert code == 2 and "bad.json:2: not a JSON object" in err

    missing = tmp_path / "missing.json"
    missing.write_text('{"source": "nope.png", "target": "x.png", "prompt": "p"}\n')
    code, err = run_cli(infer, ["--prompts", str(missing), "--out", str(tmp_path / "o2")] + base, capsys)
    assert code == 2 and "nope.png: control image listed in" in err and not (tmp_path / "o2").exists()

    escape = tmp_path / "escape.json"
    escape.write_text('{"source": "0.png", "target": "../evil.png", "prompt": "p"}\n')
    code, err = run_cli(infer, ["--prompts", str(escape), "--out", str(tmp_path / "o3")] + base, capsys)
    assert code == 2 and "must be a file name inside the folder" in err
    dot = tmp_path / "dot.json"  # "." names --out itself, which would become a PNG file
    dot.write_text('{"source": "0.png", "target": ".", "prompt": "p"}\n')
    code, err = run_cli(infer, ["--prompts", str(dot), "--out", str(tmp_path / "o3")] + base, capsys)
    assert code == 2 and "dot.json:1: target must be a file name inside the folder" in err
    assert not (tmp_path / "o3").exists()

    # --out = --source-dir: the outputs would overwrite the control images they are drawn from
    own = tmp_path / "own"
    shutil.copytree(src, own)
    before = {f.name: f.read_bytes() for f in own.iterdir()}
    code, err = run_cli(infer, ["--prompts", str(fill / "testing" / "prompt.json"), "--out", str(own),
                                "--source-dir", str(own)] + base[2:], capsys)
    assert code == 2 and "is a control image of --source-dir" in err and len(err.strip().splitlines()) == 1, err
    assert {f.name: f.read_bytes() for f in own.iterdir()} == before

    for flags, said in ((["--guidance", "nan"], "--guidance: must be a finite number"),
                        (["--control-scale", "inf"], "--control-scale: must be a finite number"),
                        (["--steps", "0"], "--steps: must be >= 1"),
                        (["--steps", "1001"], "--steps must be in [1, 1000]")):
        code, err = run_cli(infer, ["--prompts", str(fill / "testing" / "prompt.json"), "--out", str(tmp_path / "o6")]
                            + base + flags, capsys)
        assert code == 2 and said in err, (flags, err)
        assert not (tmp_path / "o6").exists()

    code, err = run_cli(infer, ["--prompts", str(fill / "testing" / "prompt.json"), "--out", str(tmp_path / "o4"),
                                "--source-dir", src, "--sd", str(tmp_path / "sd-v1-4.ckpt"),
                                "--controlnet", str(trained / "controlnet")], capsys)
    assert code == 2 and "sd-v1-4.ckpt: not found. --sd takes" in err

    code, err = run_cli(infer, ["--prompts", str(fill / "testing" / "prompt.json"), "--out", str(tmp_path / "o5"),
                                "--controlnet", str(tmp_path)] + base[:4], capsys)
    assert code == 2 and "not a ControlNet folder" in err

    run = ["--sd", str(sd_ckpt), "--out", str(tmp_path / "run"), "--size", str(SIZE)]
    code, err = run_cli(train, ["--data", str(tmp_path / "nowhere")] + run, capsys)
    assert code == 2 and "nowhere: data folder not found" in err
    code, err = run_cli(train, ["--data", str(fill), "--proportion-empty-prompts", "1.5"] + run, capsys)
    assert code == 2 and "--proportion-empty-prompts" in err
    code, err = run_cli(train, ["--data", str(fill), "--size", "100"] + run[:-2], capsys)
    assert code == 2 and "--size must be a positive multiple of 8" in err
    code, err = run_cli(train, ["--data", str(fill), "--size", "80"] + run[:-2], capsys)
    assert code == 2 and "multiple of 32 for this SD" in err  # the tiny UNet down-samples its latents twice
    assert not (tmp_path / "run").exists()

    code, err = run_cli(make, ["--out", str(tmp_path / "f"), "--n", "2", "--size", "30"], capsys)
    assert code == 2 and "--size" in err


# ------------------------------------------------------------------------------------------- evaluation

def test_evaluate_controlnet_colour_iou_fid_math_and_missing_weights(fill, tmp_path, capsys):
    from scripts.evaluate_controlnet import frechet_distance, main
    testing = fill / "testing"
    code, err = run_cli(main, ["--pred", str(testing / "target"), "--gt", str(testing / "target"),
                               "--prompts", str(testing / "prompt.json"), "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["colour_iou"] == 1.0 and res["images"] == 3
    assert "clip_weights" not in res and any("--clip-weights" in s for s in res["skipped"])
    assert "--fid-weights" in err and "sam2" in err
    # the control images as "predictions": no circle colour anywhere near the target's
    code, err = run_cli(main, ["--pred", str(testing / "source"), "--gt", str(testing / "target"),
                               "--prompts", str(testing / "prompt.json"), "--json", str(tmp_path / "r2.json")], capsys)
    assert json.loads((tmp_path / "r2.json").read_text())["colour_iou"] < 0.9
    code, err = run_cli(main, ["--pred", str(testing / "target"), "--prompts", str(testing / "prompt.json"),
                               "--clip-weights", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "nope.pt: --clip-weights file not found" in err
    # Frechet distance of two Gaussians: ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)); here S = I and 4I
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = 2 * rng.standard_normal((20000, 3)) + 1
    assert abs(frechet_distance(a, b) - (3 * 1 + 3 * (1 + 4 - 2 * 2))) < 0.15
    assert abs(frechet_distance(a, a)) < 1e-6


@pytest.fixture(scope="module")
def mini_testing(tmp_path_factory):
    """A course-style testing split of the mini preset (512-px controls and targets), and the targets at the
    mini SD's 64 px as the "generated" images, named as hw2_3.sh names them."""
    from p3_controlnet.make_fill50k import PRESET_OPTIONS, write_split
    root = tmp_path_factory.mktemp("mini_testing")
    write_split(root / "testing", 24, 512, 11, options=PRESET_OPTIONS["mini"])
    items = [json.loads(line) for line in (root / "testing" / "prompt.json").read_text().splitlines()]
    (root / "pred").mkdir()
    for it in items:
        with Image.open(root / "testing" / "target" / it["target"]) as im:
            im.resize((64, 64), Image.BILINEAR).save(root / "pred" / it["target"])
    return root, items


def test_evaluate_controlnet_fill50k_judge(mini_testing, tmp_path, capsys):
    """The judge metric on real targets (about 1.0, split by circles in the control), on prompts naming the
    wrong background, with an unreadable prompt (counted, not fatal), without --source, and bad inputs."""
    from scripts.evaluate_controlnet import main
    root, items = mini_testing
    t = root / "testing"
    base = ["--pred", str(root / "pred"), "--prompts", str(t / "prompt.json")]
    code, err = run_cli(main, base + ["--source", str(t / "source"), "--gt", str(t / "target"),
                                      "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    j = res["fill50k_judge"]
    assert j["items"] == 24 and j["unparsed_items"] == 0 and j["circles_from"] == "control"
    assert j["colour_following_share"] == 1.0 and j["background_right_share"] == 1.0 and j["iou_items"] == 24
    assert j["iou_mean"] > 0.95 and j["circle_right_share"] == 1.0 and j["both_named_circles_share"] == 1.0
    drawn = {n: sum(len(it["circles"]) == n for it in items) for n in (1, 2)}
    assert all(drawn.values()) and {k: v["items"] for k, v in j["by_circles"].items()} == {"1": drawn[1], "2": drawn[2]}
    assert j["by_circles"]["1"]["both_named_circles_share"] is None and j["by_circles"]["2"]["two_circle_items"] > 0
    assert j["striped_share"] == pytest.approx(sum(it["style"] == "stripes" for it in items) / 24)
    # colour_iou reads every caption form now ("a red circle and a blue circle with pink background.")
    from p3_controlnet.fill50k_judge import parse_prompt
    named = [it for it in items if all(c is not None for c in parse_prompt(it["prompt"]).circles)]
    assert res["colour_iou_items"] == len(named) and res["colour_iou"] > 0.95
    # every caption form make_fill50k writes is among them: article, full stop, no colour, two circles
    prompts = [it["prompt"] for it in items]
    assert any(p.startswith("a ") for p in prompts) and any(p.endswith(".") for p in prompts)
    assert any(p.startswith("two circles with") for p in prompts) and any(p.startswith("circle") for p in prompts)

    # the prompts with another background colour, one line unreadable: wrong backgrounds, one item counted apart
    wrong = tmp_path / "wrong.json"
    lines = []
    for k, it in enumerate(items):
        other = "brown" if it["background"] != "brown" and all(c["colour"] != "brown" for c in it["circles"]) \
            else "cyan" if it["background"] != "cyan" and all(c["colour"] != "cyan" for c in it["circles"]) else "red"
        prompt = "a photo of a dog" if k == 0 else it["prompt"].replace(f"{it['background']} background",
                                                                        f"{other} background")
        lines.append(json.dumps({"source": it["source"], "target": it["target"], "prompt": prompt}))
    wrong.write_text("\n".join(lines) + "\n")
    code, err = run_cli(main, ["--pred", str(root / "pred"), "--prompts", str(wrong), "--source", str(t / "source"),
                               "--json", str(tmp_path / "w.json")], capsys)
    assert code == 0, err
    j = json.loads((tmp_path / "w.json").read_text())["fill50k_judge"]
    assert j["items"] == 23 and j["unparsed_items"] == 1 and j["unparsed"][0]["prompt"] == "a photo of a dog"
    assert j["background_right_share"] == 0 and j["colour_following_share"] == 0 and j["iou_mean"] > 0.95
    assert "cannot read" in err and "not a Fill50k prompt" in err

    # without --source: colours judged, no IoU, circles counted from the prompt
    code, err = run_cli(main, base + ["--json", str(tmp_path / "n.json")], capsys)
    res = json.loads((tmp_path / "n.json").read_text())
    j = res["fill50k_judge"]
    assert code == 0 and j["iou_mean"] is None and j["iou_items"] == 0 and j["circles_from"] == "prompt"
    assert j["colour_following_share"] == 1.0 and any("--source" in s for s in res["skipped"])

    # bad inputs: one line naming the file and the flag
    code, err = run_cli(main, base + ["--source", str(tmp_path / "nope")], capsys)
    assert code == 2 and "nope: --source folder (control images) not found" in err
    partial = tmp_path / "partial_source"
    partial.mkdir()
    code, err = run_cli(main, base + ["--source", str(partial)], capsys)
    first = items[0]["source"]
    assert code == 2 and f"{partial / first}: control image listed in" in err and "(--source)" in err
    assert len(err.strip().splitlines()) == 1
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"source": "0.png", "target": "gone.png",
                                   "prompt": "red circle with navy background"}))
    code, err = run_cli(main, ["--pred", str(root / "pred"), "--prompts", str(missing)], capsys)
    assert code == 2 and "gone.png: generated image missing" in err


def test_bf16_step_keeps_trainable_weights_fp32(fill):
    """The CUDA recipe (frozen SD in bf16, ControlNet in fp32, bf16 autocast), run on the CPU."""
    from p3_controlnet.data import Fill50kDataModule
    from p3_controlnet.train import ControlNetModule, P3TrainConfig
    sd = tiny_sd_components(seed=2)
    data = Fill50kDataModule(fill, SIZE, batch_size=2, val_count=2)
    module = ControlNetModule(sd=sd, prompts=data.prompts, empty_prompt_id=data.empty_prompt_id,
                              config=P3TrainConfig(lr=1e-3), frozen_dtype=torch.bfloat16)
    module.cache_text_embeddings()
    assert module.net.unet.dtype == torch.bfloat16 and module.vae.dtype == torch.bfloat16
    assert module.text_cache.dtype == torch.bfloat16
    opt = module.configure_optimizers()
    before = module.net.controlnet.controlnet_mid_block.weight.clone()
    module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.diffusion_loss(next(iter(data.train_dataloader())))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in module.net.controlnet.parameters())
    assert module.net.controlnet.controlnet_mid_block.weight.grad.dtype == torch.float32
    assert not torch.equal(before, module.net.controlnet.controlnet_mid_block.weight)


def test_fit_bf16_on_cpu_exports_samples(fill, sd_ckpt, tmp_path, capsys):
    """--precision bf16 (the CUDA recipe) through Lightning on the CPU, including the sample export:
    the frozen UNet and text cache are bf16, so sampling must run under the same bf16 autocast as training."""
    from p3_controlnet.train import main
    out = tmp_path / "bf16"
    code, err = run_cli(main, ["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--size", str(SIZE),
                               "--max-steps", "1", "--batch-size", "2", "--sample-every", "1", "--sample-steps", "2",
                               "--val-count", "2", "--num-workers", "0", "--accelerator", "cpu", "--precision", "bf16",
                               "--quiet"], capsys)
    assert code == 0, err
    with Image.open(out / "samples" / "step_000001.png") as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.std() > 0
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # trainable weights stay fp32


def test_controlnet_clips_its_gradients_itself():
    """ControlNetModule.configure_gradient_clipping (its own, since Lightning refuses to clip for the fused
    AdamW under bf16): the gradients of the optimiser's parameters end with norm --grad-clip, as Lightning's
    norm clipping leaves them; no clip value leaves them alone."""
    from p3_controlnet.train import ControlNetModule
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW(params)
    for clip, norm in ((None, 13.0), (1.0, 1.0)):
        params[0].grad, params[1].grad = torch.tensor([3.0, 4.0, 0.0]), torch.full((2, 2), 6.0)  # norm 13
        ControlNetModule.configure_gradient_clipping(None, opt, clip)  # uses no module state
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        assert abs(total.item() - norm) < 1e-5, (clip, total)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_adamw_branch_forced_on_the_cpu_trains_the_same(precision, fill, sd_ckpt, tmp_path, capsys,
                                                               monkeypatch):
    """The CUDA branch of configure_optimizers (AdamW's fused kernel) run on the CPU: two steps end at the same
    weights as the default kernel's, to float rounding. In bf16 too, with gradient clipping on (the default):
    Lightning's mixed-precision plugin refuses to clip for a fused optimiser, so on a GPU the first step
    raised until the module clipped itself."""
    import p3_controlnet.train as train
    argv = ["--sd", str(sd_ckpt), "--data", str(fill), "--size", str(SIZE), "--max-steps", "2", "--batch-size", "2",
            "--sample-every", "2", "--sample-steps", "0", "--val-count", "2", "--num-workers", "0", "--accelerator",
            "cpu", "--quiet", "--precision", precision]
    states = {}
    for name, fused in (("default", False), ("fused", True)):
        monkeypatch.setattr(train, "fused_adamw_pays", lambda device, fused=fused: fused)
        code, err = run_cli(train.main, argv + ["--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        ck = torch.load(tmp_path / name / "last.ckpt", map_location="cpu", weights_only=False)
        assert ck["optimizer_states"][0]["param_groups"][0]["fused"] is fused
        states[name] = ck["state_dict"]
    assert states["default"].keys() == states["fused"].keys()
    for k, v in states["default"].items():
        assert torch.allclose(v, states["fused"][k], atol=1e-6, rtol=1e-5), k
    # the zero-initialised output convolution has moved: the steps did train
    assert states["fused"]["net.controlnet.controlnet_mid_block.weight"].abs().max() > 0


def test_fit_without_data_generates_fill50k_once(sd_ckpt, tmp_path, capsys):
    """No --data: make_fill50k's generator draws <out>/fill50k at the training size; a later run reuses it."""
    from p3_controlnet.train import main
    out = tmp_path / "gen_run"
    args = ["--sd", str(sd_ckpt), "--out", str(out), "--size", str(SIZE), "--generate-n", "5", "--batch-size", "2",
            "--sample-every", "2", "--sample-steps", "0", "--val-count", "2", "--num-workers", "0", "--quiet"]
    code, err = run_cli(main, args + ["--max-steps", "2"], capsys)
    assert code == 0, err
    assert "--data not given: generating 5 Fill50k samples" in err and str(out / "fill50k") in err
    training = out / "fill50k" / "training"
    lines = (training / "prompt.json").read_text().splitlines()
    assert len(lines) == 5 and "3 training items" in err
    with Image.open(training / "target" / "4.png") as im:
        assert im.size == (SIZE, SIZE)
    assert json.loads((out / "fill50k" / "settings.json").read_text())["n"] == 5
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    stamp = (training / "prompt.json").stat().st_mtime_ns
    code, err = run_cli(main, args + ["--max-steps", "3", "--resume"], capsys)
    assert code == 0, err
    assert "reusing 5 generated Fill50k samples" in err and "generating" not in err
    assert (training / "prompt.json").stat().st_mtime_ns == stamp
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    code, err = run_cli(main, args + ["--generate-n", "3"], capsys)  # fewer than --val-count + --batch-size
    assert code == 2 and "--generate-n 3: need at least" in err
    bad_sd = ["--sd", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "never")]
    code, err = run_cli(main, bad_sd + args[4:], capsys)  # a bad --sd fails before any generation
    assert code == 2 and "nope.ckpt" in err and not (tmp_path / "never").exists()


def test_fit_ddp_on_cpu(sd_ckpt, tmp_path):
    """--devices 2 runs Lightning's DDP (gloo on CPU), the multi-GPU code path: the data set is generated
    once (the second rank, started by Lightning at fit time, reuses it) and rank 0 alone exports."""
    out = tmp_path / "ddp"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "p3_controlnet" / "train.py"),
            "--sd",
            str(sd_ckpt),
            "--out",
            str(out),
            "--size",
            str(SIZE),
            "--generate-n",
            "8",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--sample-every",
            "2",
            "--sample-steps",
            "1",
            "--val-count",
            "2",
            "--num-workers",
            "0",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done at step 2") == 1
    assert "distributed_backend=gloo" in r.stderr or "world_size=2" in r.stderr
    assert r.stderr.count("generating 8 Fill50k samples") == 1 and r.stderr.count("reusing 8 generated") == 1
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert (out / "samples" / "step_000002.png").is_file() and (out / "controlnet").is_dir()


def test_demo_p3_trains_a_demo_controlnet_when_none_is_given(sd_ckpt, tmp_path):
    """make demo's P3 section: without SD it uses the mini SD and says what is missing; with SD and no ControlNet
    it trains a short one (forced here with P3_DEMO_TRAIN=1: on CUDA that is the default) and then generates,
    scores and draws."""
    env = {k: v for k, v in os.environ.items() if k not in ("SD_PATH", "CONTROLNET", "CLIP_WEIGHTS", "FID_WEIGHTS")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, P3_DEMO_SIZE=str(SIZE), CONTROLNET=str(tmp_path / "none"))
    script = str(REPO / "scripts" / "demo_p3.sh")
    # without SD_PATH the mini SD is the default; a missing ControlNet for it is said, and nothing generated
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=dict(env, OUT=str(tmp_path / "a")))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mini Stable Diffusion" in r.stdout and "skipped" in r.stdout and not (tmp_path / "a" / "p3").exists()
    r = subprocess.run(["bash", script], capture_output=True, text=True,
                       env=dict(env, OUT=str(tmp_path / "b"), SD_PATH=str(sd_ckpt), P3_DEMO_TRAIN="0"))
    assert r.returncode == 0 and "no trained ControlNet" in r.stdout and not (tmp_path / "b" / "p3_run").exists()
    out = tmp_path / "c"
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600,
                       env=dict(env, OUT=str(out), SD_PATH=str(sd_ckpt), P3_DEMO_TRAIN="1", P3_DEMO_STEPS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "p3_run" / "controlnet" / "config.json").is_file()
    lines = [json.loads(line) for line in (out / "p3_fill50k" / "testing" / "prompt.json").read_text().splitlines()]
    assert sorted(os.listdir(out / "p3")) == sorted(d["target"] for d in lines) and len(lines) == 20
    assert _read(out / "p3" / lines[0]["target"])[:2] == ("RGB", (SIZE, SIZE))
    assert "colour_iou" in json.loads((out / "p3_scores.json").read_text())
    assert (out / "p3_figs" / "two_circles.png").is_file()


def test_prompt_file_not_utf8_or_a_folder(tmp_path, capsys):
    from p3_controlnet.infer import main as infer_main
    bad = tmp_path / "prompt.json"
    bad.write_bytes(b'{"source": "s.png", "target": "t.png", "prompt": "caf\xe9"}\n')
    for prompts, needle in ((bad, "prompt.json: not UTF-8 text"), (tmp_path, "is a folder, not a prompt file")):
        out = tmp_path / "out"
        code, err = run_cli(infer_main, ["--prompts", str(prompts), "--source-dir", str(tmp_path), "--out", str(out),
                                         "--sd", str(tmp_path / "no_sd")], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_prompt_file_may_start_with_a_byte_order_mark(tmp_path):
    """Notepad's UTF-8 starts with a byte-order mark, which made the first line 'not a JSON object'."""
    from p3_controlnet.data import read_prompt_file
    f = tmp_path / "prompt.json"
    line = {"source": "s.png", "target": "t.png", "prompt": "red circle"}
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(line) + "\n").encode())
    assert read_prompt_file(f) == [line]


def test_hw2_3_checks_every_input_first_and_leaves_nothing_on_failure(fill, sd_ckpt, trained, tmp_path, capsys,
                                                                      monkeypatch):
    """A truncated 10th control image (batch 8) is found before any model is loaded; and a failure in the
    second batch adds no image to OUT (the first batch's included), while a file that was there stays."""
    import p3_controlnet.infer as infer
    src = tmp_path / "source"
    src.mkdir()
    real = sorted((fill / "testing" / "source").iterdir())
    for i in range(10):
        shutil.copy(real[i % len(real)], src / f"{i}.png")
    whole = (src / "9.png").read_bytes()
    (src / "9.png").write_bytes(whole[: len(whole) // 2])
    prompts = tmp_path / "prompt.json"
    prompts.write_text("".join(json.dumps({"source": f"{i}.png", "target": f"{i}.png", "prompt": "red circle"}) + "\n"
                               for i in range(10)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"there before")
    argv = ["--prompts", str(prompts), "--source-dir", str(src), "--out", str(out), "--sd", str(sd_ckpt),
            "--controlnet", str(trained / "controlnet"), "--size", str(SIZE), "--steps", "1", "--batch-size", "8",
            "--quiet"]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before every input was checked")

    with monkeypatch.context() as m:
        m.setattr(infer, "load_controlnet", no_model)
        m.setattr(infer.sdlib, "load_sd", no_model)
        code, err = run_cli(infer.main, argv, capsys)
    assert code == 2 and "9.png: not a readable image" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(out) == ["old.png"]

    (src / "9.png").write_bytes(whole)
    calls = []
    real_sample = infer.sample_controlnet_images

    def fails_in_batch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            from common.errors import UserError
            raise UserError("failed in the second batch")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(infer, "sample_controlnet_images", fails_in_batch_two)
    code, err = run_cli(infer.main, argv, capsys)
    assert code == 2 and "second batch" in err and len(calls) == 2
    assert os.listdir(out) == ["old.png"] and (out / "old.png").read_bytes() == b"there before"


def test_resume_from_a_truncated_or_wrong_checkpoint_is_one_line_and_writes_nothing(trained, fill, sd_ckpt, tmp_path,
                                                                                    capsys):
    """--resume with a last.ckpt that is truncated, another trainer's, or whose ControlNet has other shapes: one
    line naming the file, exit 2, and no new file in --out."""
    from p3_controlnet.train import main
    good = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=False)
    reshaped = dict(good, state_dict={**good["state_dict"], "net.controlnet.conv_in.weight": torch.zeros(2, 2)})
    whole = (trained / "last.ckpt").read_bytes()
    cases = [
        (whole[: len(whole) // 2], "last.ckpt: not a checkpoint of p3_controlnet/train.py ("),
        ({"state_dict": {}, "global_step": 1, "hyper_parameters": {"model_config": {}, "train": {}, "mode": "dann"}},
         "not a checkpoint of p3_controlnet/train.py (it has no hyper-parameter 'empty_prompt_id')"),
        (reshaped, "tensor 'net.controlnet.conv_in.weight' is (2, 2) there"),
    ]
    out = tmp_path / "run"
    out.mkdir()
    for content, needle in cases:
        if isinstance(content, bytes):
            (out / "last.ckpt").write_bytes(content)
        else:
            torch.save(content, out / "last.ckpt")
        code, err = run_cli(main, ["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--size", str(SIZE),
                                   "--max-steps", "3", "--batch-size", "2", "--sample-every", "2", "--val-count", "2",
                                   "--num-workers", "0", "--resume", "--quiet"], capsys)
        last = err.strip().splitlines()[-1]  # after the trainer's "loaded SD ..." line
        assert code == 2 and last.startswith("error: ") and needle in last and "Traceback" not in err, err
        assert os.listdir(out) == ["last.ckpt"]


def test_resume_refuses_other_settings_before_loading_sd(trained, fill, sd_ckpt, tmp_path, capsys):
    """--resume with another --batch-size, --size, --lr or --limit once trained on (or recorded settings that
    were not used); now one line naming both values, before SD is loaded, and --out unchanged."""
    import shutil

    from p3_controlnet.train import main
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = sorted(p.name for p in out.rglob("*"))
    base = ["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--max-steps", "3", "--num-workers", "0",
            "--resume", "--quiet"]
    for flags, said in ((["--batch-size", "4"], "--batch-size 2 (not 4)"), (["--size", "32"], f"--size {SIZE}"),
                        (["--lr", "0.5"], "--lr 0.001 (not 0.5)"), (["--limit", "6"], "--limit None (not 6)"),
                        (["--seed", "1"], "--seed 0 (not 1)")):
        code, err = run_cli(main, base + flags, capsys)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert sorted(p.name for p in out.rglob("*")) == before


def test_ship_checkpoint_writes_a_controlnet_folder_in_fp16(trained, tmp_path, capsys):
    """scripts/ship_checkpoint.py on a ControlNet folder: an fp16 folder that load_controlnet reads back to the
    same weights (to fp16 precision), with the metrics beside it; a bad --metrics file writes nothing."""
    from p3_controlnet.model import load_controlnet
    from scripts.ship_checkpoint import INFO_FILE
    from scripts.ship_checkpoint import main as ship_main
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"iou_mean": 0.9}))
    dst = tmp_path / "shipped"
    code, err = run_cli(ship_main, [str(trained / "controlnet"), str(dst), "--fp16", "--metrics", str(metrics),
                                    "--note", "test"], capsys)
    assert code == 0, err
    from safetensors import safe_open
    with safe_open(str(dst / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    a, b = load_controlnet(trained / "controlnet"), load_controlnet(dst)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(v, w.float(), atol=1e-3, rtol=1e-3), k
    assert json.loads((dst / INFO_FILE).read_text())["metrics"] == {"iou_mean": 0.9, "note": "test"}
    metrics.write_text("{not json")
    code, err = run_cli(ship_main, [str(trained / "controlnet"), str(tmp_path / "bad"), "--metrics", str(metrics)],
                        capsys)
    assert code == 2 and "m.json: not a readable JSON file" in err and not (tmp_path / "bad").exists()


def test_cooldown_reaches_zero_and_a_constant_run_resumes_into_it(fill, sd_ckpt, tmp_path):
    """--cooldown-from S: the rate falls linearly to 0 at --max-steps, counted by the trainer's step, so a
    constant-rate run (no scheduler in its checkpoint) resumed with it lands on the same rates as a run that
    had it from the start."""
    from p3_controlnet.train import main

    def run(out, *extra):
        main(["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--size", str(SIZE), "--batch-size", "2",
              "--sample-every", "2", "--sample-steps", "0", "--val-count", "2", "--lr", "1e-3", "--quiet", *extra])
        return torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)

    whole = run(tmp_path / "whole", "--max-steps", "4", "--cooldown-from", "2")
    assert whole["global_step"] == 4 and whole["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    run(tmp_path / "split", "--max-steps", "2")
    split = run(tmp_path / "split", "--max-steps", "4", "--cooldown-from", "2", "--resume")
    assert split["global_step"] == 4 and split["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    # the rates of steps 3 and 4 (1e-3 x 2/2, x 1/2) left the same weights as the uninterrupted run
    for k, v in whole["state_dict"].items():
        assert torch.allclose(v, split["state_dict"][k], atol=1e-6), k
    with pytest.raises(SystemExit):
        main(["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(tmp_path / "bad"), "--max-steps", "4",
              "--cooldown-from", "4", "--quiet"])


def test_init_from_a_trained_controlnet_and_ema_export(trained, fill, sd_ckpt, tmp_path, capsys):
    """--init-from starts the ControlNet from a trained folder (not the UNet-encoder copy); with --ema-decay the
    exported controlnet/ is the EMA, which last.ckpt holds beside the raw weights; a ControlNet that does not fit
    the --sd is refused in one line before anything is written."""
    from diffusers import ControlNetModel

    from p3_controlnet.model import load_controlnet, save_controlnet
    from p3_controlnet.train import main

    def run(out, *extra):
        return run_cli(main, ["--sd", str(sd_ckpt), "--data", str(fill), "--out", str(out), "--size", str(SIZE),
                              "--batch-size", "2", "--sample-every", "2", "--sample-steps", "0", "--val-count", "2",
                              "--num-workers", "0", "--quiet", *extra], capsys)

    init = load_controlnet(trained / "controlnet").state_dict()
    code, err = run(tmp_path / "frozen", "--init-from", str(trained / "controlnet"), "--max-steps", "1", "--lr", "0")
    assert code == 0, err
    ck = torch.load(tmp_path / "frozen" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("ema.") for k in ck["state_dict"])  # no EMA unless asked for
    for k, v in init.items():  # lr 0 (weight decay scales with it): still exactly the trained folder's weights
        assert torch.equal(ck["state_dict"][f"net.controlnet.{k}"], v), k

    code, err = run(tmp_path / "ema", "--init-from", str(trained / "controlnet"), "--max-steps", "2", "--lr", "1e-3",
                    "--ema-decay", "0.9")
    assert code == 0, err
    ck = torch.load(tmp_path / "ema" / "last.ckpt", map_location="cpu", weights_only=False)
    exported = load_controlnet(tmp_path / "ema" / "controlnet").state_dict()
    key = "controlnet_mid_block.weight"
    ema, raw = ck["state_dict"][f"ema.module.{key}"], ck["state_dict"][f"net.controlnet.{key}"]
    assert int(ck["state_dict"]["ema.num_updates"]) == 2
    assert torch.equal(exported[key], ema) and not torch.equal(ema, raw) and not torch.equal(ema, init[key])
    # the EMA lies between where the weights started and where they are now
    assert (ema - init[key]).norm() < (raw - init[key]).norm()

    comps = tiny_sd_components(1)
    other = ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    save_controlnet(other, tmp_path / "other")
    for bad, says in ((tmp_path / "other", "(--init-from): shape mismatch"), (tmp_path / "nowhere", "not found")):
        code, err = run(tmp_path / "refused", "--init-from", str(bad), "--max-steps", "1")
        assert code == 2 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]  # after the progress line of loading --sd
        assert last.startswith("error:") and says in last and err.count("error:") == 1, err
        assert not (tmp_path / "refused" / "last.ckpt").exists()


def test_train_with_compile_keeps_plain_names_and_exports(fill, sd_ckpt, tmp_path, capsys, monkeypatch):
    """--compile (meant for long CUDA runs) compiles the ControlNet and the UNet in place, on the CPU too:
    the run trains, its checkpoint keeps the parameter names an uncompiled run has (so either resumes the
    other), and the exported ControlNet loads. Dynamo traces the real graphs (gradient checkpointing and all)
    through AOTAutograd; only inductor's code generation is swapped for eager kernels, which took four minutes
    of C++ compiling here for one step."""
    from p3_controlnet.train import main
    compiled = []
    real_compile = torch.nn.Module.compile

    def compile_aot_eager(module, **kwargs):
        compiled.append(type(module).__name__)
        real_compile(module, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    argv = ["--sd", str(sd_ckpt), "--data", str(fill), "--size", str(SIZE), "--max-steps", "1", "--batch-size", "2",
            "--sample-every", "1", "--sample-steps", "0", "--val-count", "2", "--num-workers", "0", "--accelerator",
            "cpu", "--quiet"]
    keys = {}
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        code, err = run_cli(main, argv + ["--out", str(tmp_path / name)] + extra, capsys)
        assert code == 0, err
        ck = torch.load(tmp_path / name / "last.ckpt", map_location="cpu", weights_only=False)
        assert ck["global_step"] == 1
        keys[name] = set(ck["state_dict"])
    assert sorted(compiled) == ["ControlNetModel", "UNet2DConditionModel"]
    assert keys["compiled"] == keys["plain"] and not any("_orig_mod" in k for k in keys["compiled"])
    from p3_controlnet.model import load_controlnet
    load_controlnet(tmp_path / "compiled" / "controlnet")
