"""The mini Stable Diffusion (issue 16): its architecture loads through load_sd in both formats, the latent
scale folds into the VAE, the VAE stage of scripts/train_mini_sd.py trains, validates, exports and resumes,
and its UNet stage trains, resumes to the same bytes, judges its samples and exports a model load_sd loads."""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch

from common.stable_diffusion import encode_prompts, load_sd
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def mini():
    from common.mini_sd import MINI_TEXT, MINI_UNET, MINI_VAE
    from common.sd_export import build_sd_components
    # random, with no all-zero weight, so a weight lost on the way changes the output
    return build_sd_components(MINI_UNET, MINI_VAE, MINI_TEXT, seed=4, name="mini")


def _rounded(comps, dtype=torch.float16):
    """`comps` with its weights rounded to `dtype` and back: what an fp16 export holds."""
    from common.stable_diffusion import SDComponents
    return SDComponents(*(copy.deepcopy(m).to(dtype).float() for m in (comps.vae, comps.unet, comps.text_encoder)),
                        comps.tokenizer, comps.noise_scheduler, "rounded")


def _outputs(comps):
    torch.manual_seed(0)
    with torch.no_grad():
        ctx = encode_prompts(comps.tokenizer, comps.text_encoder, ["a red circle with navy background."], "cpu")
        x = torch.randn(1, 4, 8, 8)
        eps = comps.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        img = comps.vae.decode(x).sample
        z = comps.vae.encode(img.clamp(-1, 1)).latent_dist.mean
    return ctx, eps, img, z


def test_mini_sizes(mini):
    count = {name: sum(p.numel() for p in getattr(mini, name).parameters()) / 1e6
             for name in ("vae", "unet", "text_encoder")}
    assert 1.0 < count["vae"] < 2.0 and 5.0 < count["unet"] < 7.0 and count["text_encoder"] < 7.5
    assert sum(count.values()) * 2 < 30  # MB in fp16, leaving room for a ControlNet in the 40 MB budget
    with torch.no_grad():
        z = mini.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8) and mini.vae_scale_factor == 8
    sched = mini.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        1000, "scaled_linear", 0.00085, 0.012)


def test_export_loads_with_load_sd_in_fp16(mini, tmp_path):
    from common.mini_sd import export_diffusers, read_info
    folder = export_diffusers(mini, tmp_path / "mini_sd", {"native_resolution": 64, "stages": {}})
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "vae/diffusion_pytorch_model.safetensors" in files and "text_encoder/model.safetensors" in files
    assert read_info(folder) == {"native_resolution": 64, "stages": {}}
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**20
    assert size < 30
    # fp16 on disk: the loaded model computes what the fp16-rounded original does, exactly
    loaded = load_sd(folder)
    for a, b in zip(_outputs(loaded), _outputs(_rounded(mini))):
        assert torch.equal(a, b)
    assert loaded.unet.dtype == torch.float32
    # exporting again replaces the folder whole
    export_diffusers(mini, folder, {"native_resolution": 64, "stages": {"vae": {}}})
    assert read_info(folder)["stages"] == {"vae": {}} and not list(tmp_path.glob(".mini_sd.*"))


def test_mini_architecture_loads_from_an_ldm_single_file(mini, tmp_path):
    """Only shapes survive in an LDM file: the mini sizes must be ones the single-file loader infers right."""
    from common.mini_sd import export_single_file
    path = export_single_file(mini, tmp_path / "mini_sd.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini_sd.safetensors"]
    loaded = load_sd(path)
    assert loaded.text_encoder.config.num_attention_heads == 2
    assert loaded.native_resolution == 64  # recorded in the file: the weights alone would say SD v1's 512
    for a, b in zip(_outputs(loaded), _outputs(_rounded(mini))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fold_latent_scale_keeps_decoding(mini):
    from common.mini_sd import fold_latent_scale
    vae = copy.deepcopy(mini.vae)
    fold_latent_scale(vae, 3.0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before, after = mini.vae.encode(x).latent_dist, vae.encode(x).latent_dist
        torch.testing.assert_close(after.mean, 3 * before.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.std, 3 * before.std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vae.decode(after.mean).sample, mini.vae.decode(before.mean).sample,
                                   rtol=1e-4, atol=1e-5)


def test_colour_conversion_reference_values():
    from common.colour import delta_e, rgb255_to_lab
    lab = rgb255_to_lab([[255, 0, 0], [0, 0, 128], [255, 255, 255], [0, 0, 0]])
    ref = torch.tensor([[53.24, 80.09, 67.20], [12.98, 47.50, -64.70], [100.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(lab, ref, atol=0.02, rtol=0)
    a = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 2, 2)
    b = torch.tensor([0.0, 0.0, 128 / 255])[:, None, None].expand(3, 2, 2)
    d = delta_e(a, b)
    assert d.shape == (2, 2) and torch.allclose(d, (ref[0] - ref[1]).norm().expand(2, 2), atol=0.05)
    x = torch.zeros(3, 4, 4, requires_grad=True)  # black: the linear segment keeps the gradient finite
    delta_e(x, torch.full((3, 4, 4), 0.5)).sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------- VAE stage

def test_region_delta_e_and_loss_are_zero_on_the_image_and_measure_a_shift():
    from common.colour import rgb255_to_lab
    from scripts.train_mini_sd import foreground_mask, region_delta_e, vae_reconstruction_loss
    img = torch.full((1, 3, 16, 16), -1.0)
    img[:, 0] = 1.0  # red background
    img[:, :, 4:10, 4:10] = torch.tensor([-1.0, -1.0, 128 / 127.5 - 1])[:, None, None]  # a navy square
    fg = foreground_mask(img)
    assert fg.sum() == 36 and fg[0, 0, 5, 5] == 1 and fg[0, 0, 0, 0] == 0
    de_circle, de_background = region_delta_e(img, img)
    assert de_circle.item() == 0 and de_background.item() == 0
    loss, parts = vae_reconstruction_loss(img, img, 1.0, 3.0)
    assert loss.item() == 0
    # the square reconstructed in the background colour: its inner 4x4 pixels are off by red-to-navy
    recon = img.clone()
    recon[:, :, 4:10, 4:10] = img[:, :, :1, :1]
    de_circle, de_background = region_delta_e(recon, img)
    lab = rgb255_to_lab([[255, 0, 0], [0, 0, 128]])
    torch.testing.assert_close(de_circle, (lab[0] - lab[1]).norm()[None], atol=0.05, rtol=0)
    assert de_background.item() == 0  # the eroded background does not reach the square's edge
    loss, parts = vae_reconstruction_loss(recon, img, 1.0, 3.0)
    # 36 of 256 pixels wrong, weighing 3: the RGB error is 3*36*(2+0+1.004)/3 / (220 + 3*36)
    torch.testing.assert_close(parts["l1"], torch.tensor(3 * 36 * (2 + 128 / 127.5) / 3 / (220 + 108)))


def test_vae_stage_trains_exports_and_resumes(tmp_path, capsys):
    from safetensors.torch import load_file

    from common.mini_sd import build_vae
    from scripts.train_mini_sd import load_targets, main
    out = tmp_path / "vae"
    args = ["--out", str(out), "--n-images", "40", "--val-count", "8", "--size", "32", "--val-every", "2",
            "--batch-size", "4", "--vae-channels", "32,32,32,32", "--ae-warmup-steps", "2", "--threads", "1",
            "--quiet"]
    main(args + ["--max-steps", "2"])
    main(args + ["--max-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert err.count("generating 40 mini-preset") == 1  # the second run reuses the data
    rows = list(csv.DictReader(open(out / "val_curve.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    # training time adds up across the resumed runs
    assert float(rows[1]["train_minutes"]) >= float(rows[0]["train_minutes"]) and float(rows[1]["train_minutes"]) > 0
    info = json.loads((out / "vae.json").read_text())
    assert info["kind"] == "mini_sd_vae" and info["metrics"]["step"] == 4 and info["metrics"]["val_items"] == 8
    assert {"de_circle", "de_background", "pass_share"} <= set(info["metrics"])
    assert (out / "best_vae.safetensors").is_file() and (out / "samples" / "step_000004.png").is_file()
    # the exported VAE's latents, scaled by SD's factor, have unit spread on the validation images
    vae = build_vae(info["config"]["vae"]).eval()
    vae.load_state_dict(load_file(str(out / "vae.safetensors")))
    images, _ = load_targets(out / "data" / "training", 32)
    with torch.no_grad():
        z = vae.encode(images[-8:].float() / 127.5 - 1).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    # resumed = uninterrupted, to the byte (the batches once came from a shuffled loader that restarted its
    # epoch on resume)
    whole = tmp_path / "whole"
    main([str(whole) if a == str(out) else a for a in args] + ["--max-steps", "4", "--data", str(out / "data")])
    assert (whole / "vae.safetensors").read_bytes() == (out / "vae.safetensors").read_bytes()
    # a 3-step run exports its last step too (once, nothing was exported after step 2), and --resume keeps the
    # run's settings
    main(args + ["--max-steps", "5", "--resume"])
    assert json.loads((out / "vae.json").read_text())["metrics"]["step"] == 5
    capsys.readouterr()
    code, err = run_cli(main, args + ["--max-steps", "6", "--batch-size", "8", "--resume"], capsys)
    assert code == 2 and "--batch-size 4 (not 8)" in err, err


# ------------------------------------------------------------------------------------------ UNet stage

def _tiny_vae(path):
    """A random VAE checkpoint as --stage vae writes one (32-px images -> 4x4 latents)."""
    from common.checkpoint import save_checkpoint
    from common.mini_sd import build_vae
    from scripts.train_mini_sd import VAE_KIND, MiniSDTrainConfig
    torch.manual_seed(0)
    config = MiniSDTrainConfig(size=32, vae_channels="32,32,32,32").vae_config()
    save_checkpoint(path, build_vae(config).state_dict(), VAE_KIND, {"vae": config}, {"step": 0, "de_circle": 9.0})
    return path


UNET_ARGS = ["--stage", "unet", "--n-images", "40", "--val-count", "8", "--size", "32", "--batch-size", "4",
             "--unet-channels", "32,32,32", "--text-width", "64", "--text-layers", "1", "--val-every", "2",
             "--val-prompts", "4", "--val-steps", "2", "--threads", "1", "--quiet"]


def _ckpt_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_unet_stage_trains_resumes_exactly_judges_and_exports(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from common.datasets import load_image
    from common.mini_sd import read_info
    from scripts.train_mini_sd import MiniUNetModule, main
    vae = str(_tiny_vae(tmp_path / "vae.safetensors"))
    a, b = tmp_path / "a", tmp_path / "b"
    main(UNET_ARGS + ["--vae", vae, "--out", str(a), "--max-steps", "4"])
    # the same run stopped at step 2 and resumed (without --vae: the VAE is in the checkpoint)
    main(UNET_ARGS + ["--vae", vae, "--out", str(b), "--max-steps", "2"])
    # a model that draws exactly the held-out targets: the validation's judge must give it every colour
    real_sample = MiniUNetModule.sample

    def draw_targets(self, prompts, seeds, steps, guidance, batch=128):
        assert len(real_sample(self, prompts[:1], seeds[:1], steps, guidance)) == 1
        targets = b / "data" / "training" / "target"
        return np.stack([load_image(targets / f"{it['index']}.png") for it in self.val_items])
    monkeypatch.setattr(MiniUNetModule, "sample", draw_targets)
    main(UNET_ARGS + ["--out", str(b), "--max-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert err.count("encoding the targets") == 2  # once per output folder: the resumed run reuses the cache

    # resumed == uninterrupted, to the byte: weights, EMA, optimiser moments and the exported model
    sa, sb = _ckpt_state(a / "last.ckpt"), _ckpt_state(b / "last.ckpt")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa = torch.load(a / "last.ckpt", map_location="cpu", weights_only=False)["optimizer_states"][0]["state"]
    ob = torch.load(b / "last.ckpt", map_location="cpu", weights_only=False)["optimizer_states"][0]["state"]
    assert all(torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]) for k in oa)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (a / "model" / part).read_bytes() == (b / "model" / part).read_bytes()

    # validation: the loss and the judge's colour-following share on the curve, best model kept by it
    rows = {p: list(csv.DictReader(open(p / "val_curve.csv"))) for p in (a, b)}
    assert [int(r["step"]) for r in rows[a]] == [2, 4] and [int(r["step"]) for r in rows[b]] == [2, 4]
    assert rows[a][1]["val_loss"] == rows[b][1]["val_loss"]
    assert all(0 <= float(r["colour_share"]) <= 1 for r in rows[a])
    assert float(rows[b][1]["colour_share"]) == 1.0 and float(rows[b][1]["two_circle_share"]) in (0.0, 1.0)
    assert read_info(b / "best_model")["stages"]["unet"]["metrics"]["step"] == 4
    prompts = json.loads((a / "val_prompts.json").read_text())
    assert 1 <= len(prompts) <= 4 and all(p["index"] >= 32 for p in prompts)
    assert (a / "samples" / "step_000004.png").is_file()

    # the export: a diffusers folder load_sd loads, the EMA weights in fp16, with how it was trained
    info = read_info(a / "model")
    assert info["native_resolution"] == 32 and info["latent_size"] == 4
    assert info["stages"]["vae"]["metrics"]["de_circle"] == 9.0 and info["stages"]["unet"]["metrics"]["step"] == 4
    assert "--stage unet" in info["stages"]["unet"]["command"] and info["validation"]["guidance"] == 5.0
    loaded = load_sd(a / "model")
    assert loaded.unet.config.block_out_channels == [32, 32, 32] and loaded.text_encoder.config.hidden_size == 64
    ema = {k[len("ema.module.unet."):]: v for k, v in sa.items() if k.startswith("ema.module.unet.")}
    exported = load_file(str(a / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], v.half()) for k, v in ema.items())
    vae_in = {k[len("vae."):]: v for k, v in sa.items() if k.startswith("vae.")}
    assert all(torch.equal(loaded.vae.state_dict()[k], v.half().float()) for k, v in vae_in.items())
    ctx = encode_prompts(loaded.tokenizer, loaded.text_encoder, ["a red circle with navy background."], "cpu")
    assert ctx.shape == (1, 77, 64)


def test_unet_stage_needs_its_vae(tmp_path, capsys):
    from scripts.train_mini_sd import main
    code, err = run_cli(main, ["--stage", "unet", "--out", str(tmp_path / "u")], capsys)
    assert code == 2 and "--stage unet needs --vae" in err and not (tmp_path / "u").exists()
    code, err = run_cli(main, ["--stage", "vae", "--vae", "x", "--out", str(tmp_path / "u")], capsys)
    assert code == 2 and "--vae is an input of --stage unet" in err
    code, err = run_cli(main, ["--stage", "unet", "--vae", str(tmp_path / "none.safetensors"),
                               "--out", str(tmp_path / "u"), "--n-images", "20", "--val-count", "4",
                               "--batch-size", "4", "--size", "32"], capsys)
    assert code == 2 and "checkpoint not found" in err
    code, err = run_cli(main, UNET_ARGS + ["--vae", "v", "--out", str(tmp_path / "u"), "--text-width", "96"], capsys)
    assert code == 2 and "--text-width must be a multiple of 64" in err


def test_validation_prompts_are_held_out_and_name_every_colour():
    from scripts.train_mini_sd import validation_prompts
    items = [{"prompt": p} for p in ("red circle with pink background", "circle with pink background",
                                     "two circles with navy background", "a red circle and a blue circle with "
                                     "pink background.", "not a caption", "blue circle with red background")]
    chosen = validation_prompts(items, 1, 10, seed=3)
    assert [c["index"] for c in chosen] == [3, 5] and chosen[0]["seed"] != chosen[1]["seed"]
    assert validation_prompts(items, 0, 1, seed=3)[0]["index"] == 0


def test_textual_inversion_data_shows_each_concept_and_reads_as_course_input(tmp_path):
    from PIL import Image

    from p5_personalization.concepts import read_input_json
    from p5_personalization.train_ti import list_concept_images, read_captions
    from scripts import make_mini_ti_data as mk
    mk.main(["--out", str(tmp_path / "a")])
    mk.main(["--out", str(tmp_path / "b")])
    for name in mk.CONCEPTS:
        files = list_concept_images(str(tmp_path / "a" / name))
        assert [f.name for f in files] == [f"{k}.png" for k in range(mk.IMAGES)]
        captions = read_captions(str(tmp_path / "a" / name / "captions.json"), files)
        for f in files:
            assert (tmp_path / "b" / name / f.name).read_bytes() == f.read_bytes()  # same seed, same bytes
            pixels = np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3)
            colours = {tuple(p) for p in pixels}
            chartreuse = (127, 255, 0) in colours
            striped = (255, 255, 255) in colours
            assert (chartreuse, striped) == ((True, False) if name == "new1" else (False, True)), f
            assert "chartreuse" not in " ".join(captions[f.name])
            # every caption form of the data: with and without "a", with and without the full stop
            assert len(set(captions[f.name])) == 4 and all("{}" in c for c in captions[f.name])
        if name == "new2":  # the style on five different paints: "{} <colour> circle with ..."
            paints = {captions[f.name][0].split("{} ")[1].split(" circle")[0] for f in files}
            assert len(paints) == mk.IMAGES, paints
    for which in ("input.json", "input_init_word.json"):
        cases = read_input_json(tmp_path / "a" / which)
        assert len(cases) == 3
    # validation prompts: each token alone, none of input.json's prompts in any caption form
    val = read_input_json(tmp_path / "a" / "input_val.json")
    bare = {p.removeprefix("a ").removesuffix(".") for c in read_input_json(tmp_path / "a" / "input.json")
            for p in c.prompts}
    assert [c.tokens for c in val] == [["<new1>"], ["<new2>"]] and all(len(c.prompts) == 6 for c in val)
    assert not {p.removeprefix("a ").removesuffix(".") for c in val for p in c.prompts} & bare
    # prior images: the mini SD's own data with its captions (no token), the same bytes from the same seed
    prior = list_concept_images(str(tmp_path / "a" / "prior"))
    prior_caps = read_captions(str(tmp_path / "a" / "prior" / "captions.json"), prior, flag="--prior-captions")
    assert len(prior) == mk.PRIOR_IMAGES and all("circle" in prior_caps[f.name][0] for f in prior)
    assert all((tmp_path / "b" / "prior" / f.name).read_bytes() == f.read_bytes() for f in prior)
    assert len({f.read_bytes() for f in prior}) == len(prior)
    baseline = json.loads((tmp_path / "a" / "input_init_word.json").read_text())
    prompts = [p for e in baseline.values() for p in e["prompt"]]
    assert not any("<new" in p for p in prompts) and "green circle with pink background" in prompts


def test_native_resolution_is_read_from_the_model(mini, tmp_path):
    from types import SimpleNamespace

    from common.stable_diffusion import SDComponents, shipped_config
    assert mini.native_resolution == 64
    # an LDM file without the record is read as SD v1 (512 px), as sd-v1-4.ckpt is; with it, at its own size
    from common.sd_export import write_ldm_checkpoint
    for suffix in (".ckpt", ".safetensors"):
        assert load_sd(write_ldm_checkpoint(mini, tmp_path / f"plain{suffix}")).native_resolution == 512
        assert load_sd(write_ldm_checkpoint(mini, tmp_path / f"mini{suffix}", native_resolution=64)
                       ).native_resolution == 64
    # SD v1.4's own configs (as shipped for single-file loading): 64 latents x 8 = 512 px
    unet, vae = shipped_config("unet"), shipped_config("vae")
    sd14 = SDComponents(SimpleNamespace(config=SimpleNamespace(**vae)), SimpleNamespace(config=SimpleNamespace(**unet)),
                        None, None, None, "sd-v1-4")
    assert sd14.native_resolution == 512
    assert (sd14.size_multiple, mini.size_multiple) == (64, 32)  # latents down-sampled 3 and 2 times
