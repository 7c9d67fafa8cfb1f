"""common.stable_diffusion: the CLIP tokenizer from open_clip's BPE, both checkpoint formats, offline, bad paths."""
from __future__ import annotations

import socket

import pytest
import torch

from common.errors import UserError
from common.stable_diffusion import (
    build_clip_tokenizer,
    encode_prompts,
    initial_latents,
    load_sd,
    make_ddim_scheduler,
    sample_latents,
)
from tests.conftest import plant_nan
from tests.tiny_sd import TINY_IMAGE, tiny_sd_components, write_tiny_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    comps = tiny_sd_components(seed=3)
    root = tmp_path_factory.mktemp("tiny_sd")
    paths = {fmt: write_tiny_sd(root / fmt, fmt, comps=comps) for fmt in ("diffusers", "ldm", "ldm-safetensors")}
    return comps, paths


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_tokenizer_matches_clip_ids(no_network):
    tok = build_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok(
        ["red circle with blue background"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert padded.shape == (1, 77) and padded[0, 0] == 49406 and (padded[0, -5:] == 49407).all()
    # the same ids as open_clip's own tokenizer on the BPE it ships (open_clip pads with 0 instead of eos)
    import open_clip
    text = "Light golden-rod YELLOW circle, with coral background!"
    ref = [int(i) for i in open_clip.tokenize([text])[0] if i != 0]
    assert tok(text).input_ids == ref


def _outputs(comps):
    torch.manual_seed(0)
    ids_prompt = ["a photo of a cat", "blue circle with red background"]
    with torch.no_grad():
        ctx = encode_prompts(comps.tokenizer, comps.text_encoder, ids_prompt, "cpu")
        x = torch.randn(2, 4, TINY_IMAGE // 8, TINY_IMAGE // 8)
        eps = comps.unet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample
        img = comps.vae.decode(x).sample
        z = comps.vae.encode(img).latent_dist.mean
    return ctx, eps, img, z


@pytest.mark.parametrize("fmt", ["ldm", "ldm-safetensors"])
def test_single_file_ldm_matches_diffusers_folder(tiny, fmt, no_network):
    comps, paths = tiny
    if fmt == "ldm":  # like sd-v1-4.ckpt, the pickle holds a class torch's weights-only unpickler refuses
        import pickle
        with pytest.raises(pickle.UnpicklingError):
            torch.load(paths[fmt], weights_only=True)
    from_folder = load_sd(paths["diffusers"])
    from_file = load_sd(paths[fmt])
    assert from_file.unet.config.block_out_channels == list(comps.unet.config.block_out_channels)
    assert from_file.unet.config.down_block_types == list(comps.unet.config.down_block_types)
    assert from_file.vae.config.block_out_channels == list(comps.vae.config.block_out_channels)
    assert from_file.text_encoder.config.hidden_size == comps.text_encoder.config.hidden_size
    ref = _outputs(comps)
    for loaded in (from_folder, from_file):
        for a, b in zip(_outputs(loaded), ref):
            assert torch.equal(a, b)
    # and the weights really matter: a different tiny SD gives different outputs
    other = _outputs(tiny_sd_components(seed=4))
    assert not torch.allclose(other[1], ref[1])


def test_loaded_schedulers_are_sd_v1(tiny):
    comps, paths = tiny
    sd = load_sd(paths["ldm"])
    cfg = sd.noise_scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.prediction_type) == \
        (1000, "scaled_linear", 0.00085, 0.012, "epsilon")
    ddim = make_ddim_scheduler(sd.noise_scheduler)
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1  # LDM's uniform DDIM grid with offset 1
    assert ddim.config.set_alpha_to_one is False


@pytest.mark.parametrize("kind, word", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", None)])
def test_prediction_follows_the_folders_scheduler(tiny, tmp_path, kind, word):
    """What the trainers' loss targets comes from the SD's scheduler (SD v1: eps; a v-prediction SD: v); a kind
    they cannot train is one line naming the SD when asked."""
    import json
    import shutil
    folder = tmp_path / "sd"
    shutil.copytree(tiny[1]["diffusers"], folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": kind}))
    sd = load_sd(folder)
    assert sd.noise_scheduler.config.prediction_type == kind
    if word is not None:
        assert sd.prediction == word
    else:
        with pytest.raises(UserError, match="prediction_type is 'sample'") as info:
            sd.prediction  # noqa: B018
        assert str(folder) in str(info.value)


def test_load_sd_dtype_and_sampling_is_batch_invariant(tiny):
    comps, paths = tiny
    half = load_sd(paths["diffusers"], dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    sd = load_sd(paths["diffusers"])
    # the text encoder is never rounded: P3's bf16 inference embeds its prompts as training did
    assert half.text_encoder.dtype == torch.float32
    full = sd.text_encoder.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in half.text_encoder.state_dict().items())
    with torch.no_grad():
        cond = encode_prompts(sd.tokenizer, sd.text_encoder, ["a", "b", "c"], "cpu")
        uncond = encode_prompts(sd.tokenizer, sd.text_encoder, [""] * 3, "cpu")
    lat = initial_latents([42, 43, 44], (4, 8, 8), "cpu")
    sched = make_ddim_scheduler(sd.noise_scheduler)
    whole = sample_latents(sd.unet, sched, lat, cond, uncond, steps=3, guidance=7.5)
    one = sample_latents(sd.unet, sched, lat[1:2], cond[1:2], uncond[1:2], steps=3, guidance=7.5)
    # fp32 convolutions may round differently per batch size (up to ~2e-5 here on latents of size ~6);
    # the starting noise itself is identical
    assert torch.allclose(whole[1:2], one, atol=1e-4)
    assert torch.equal(initial_latents([43], (4, 8, 8), "cpu")[0], lat[1])


def test_bad_paths(tmp_path, tiny):
    with pytest.raises(UserError, match="not found.*--sd"):
        load_sd(tmp_path / "missing.ckpt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="not a diffusers Stable Diffusion folder"):
        load_sd(tmp_path / "empty_dir")
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.ckpt: not a readable checkpoint"):
        load_sd(bad)
    with pytest.raises(UserError, match="unrecognised file type"):
        load_sd(_touch(tmp_path / "sd.txt"))
    from safetensors.torch import save_file
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UserError, match="not an SD v1.x LDM checkpoint: no UNet"):
        load_sd(other)
    # a checkpoint cut short (interrupted download)
    data = tiny[1]["ldm-safetensors"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.safetensors: not a readable checkpoint"):
        load_sd(cut)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_truncated_diffusers_folder_is_one_line_error_naming_the_file(tiny, tmp_path, part):
    """A diffusers folder whose weights file was cut short (interrupted download): a UserError naming the
    file, not safetensors' raw SafetensorError traceback."""
    import shutil
    folder = tmp_path / "sd"
    shutil.copytree(tiny[1]["diffusers"], folder)
    (weights,) = (folder / part).glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{weights.name}: not a readable safetensors file") as info:
        load_sd(folder)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "model.diffusion_model.", "first_stage_model.",
                                  "cond_stage_model."])
def test_non_finite_weights_are_refused_naming_the_file(tiny, tmp_path, part):
    """A NaN in an SD folder's or single file's weights (a diverged fine-tune saved as SD) is one line naming the
    file, not black images."""
    import shutil

    if part.endswith("."):  # a part of a single-file LDM checkpoint, by its key prefix
        weights = target = tmp_path / "sd.safetensors"
        shutil.copy(tiny[1]["ldm-safetensors"], weights)
    else:
        target = tmp_path / "sd"
        shutil.copytree(tiny[1]["diffusers"], target)
        (weights,) = (target / part).glob("*.safetensors")
    plant_nan(weights, part if part.endswith(".") else "")
    with pytest.raises(UserError, match="contains NaN or infinity") as info:
        load_sd(target)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def _touch(p):
    p.write_text("x")
    return p


# older diffusers (before 0.14) saved the VAE's mid-block attention as an `AttentionBlock` with these names;
# SD v1 folders converted back then (e.g. early CompVis/stable-diffusion-v1-4 revisions) still have them.
# Hand-mapped here only to WRITE such a folder; load_sd converts them with diffusers' own method.
LEGACY_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _write_legacy_vae_names(folder):
    from safetensors.torch import load_file, save_file
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd, out, renamed = load_file(str(f)), {}, 0
    for k, v in sd.items():
        for side in ("encoder", "decoder"):
            prefix = f"{side}.mid_block.attentions.0."
            name, _, leaf = k[len(prefix):].rpartition(".")
            if k.startswith(prefix) and name in LEGACY_VAE_ATTN:
                k, renamed = f"{prefix}{LEGACY_VAE_ATTN[name]}.{leaf}", renamed + 1
        out[k] = v
    assert renamed == 16  # q, k, v, out x weight, bias x encoder, decoder
    save_file(out, str(f), metadata={"format": "pt"})
    return f


@pytest.fixture(scope="module")
def legacy_vae_folder(tiny, tmp_path_factory):
    comps, _ = tiny
    folder = write_tiny_sd(tmp_path_factory.mktemp("legacy_vae"), "diffusers", comps=comps)
    return folder, _write_legacy_vae_names(folder)


def test_diffusers_folder_with_legacy_vae_attention_names_loads(legacy_vae_folder):
    # before the fix: "its vae weights do not fit SD v1: 16 missing (...to_k...), 16 unexpected (...key...)"
    folder, weights = legacy_vae_folder
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert "encoder.mid_block.attentions.0.query.weight" in keys
    assert not any(".to_q." in k or ".to_out." in k for k in keys)  # really the legacy names only
    load_sd(folder)


def test_legacy_vae_attention_names_give_the_same_outputs(tiny, legacy_vae_folder, no_network):
    comps, paths = tiny
    legacy, current = load_sd(legacy_vae_folder[0]), load_sd(paths["diffusers"])
    torch.manual_seed(0)
    img = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE) * 2 - 1
    x = torch.randn(2, 4, TINY_IMAGE // 8, TINY_IMAGE // 8)
    with torch.no_grad():
        for a, b in ((legacy, current), (legacy, comps)):
            assert torch.equal(a.vae.encode(img).latent_dist.mean, b.vae.encode(img).latent_dist.mean)
            assert torch.equal(a.vae.encode(img).latent_dist.std, b.vae.encode(img).latent_dist.std)
            assert torch.equal(a.vae.decode(x).sample, b.vae.decode(x).sample)
    for a, b in zip(_outputs(legacy), _outputs(current)):
        assert torch.equal(a, b)
    # the test's legacy writer mirrors what diffusers itself converts: its own loader reads the same weights
    from diffusers import AutoencoderKL
    ref = AutoencoderKL.from_pretrained(legacy_vae_folder[0] / "vae", local_files_only=True, low_cpu_mem_usage=False)
    own = legacy.vae.state_dict()
    assert set(ref.state_dict()) == set(own)
    assert all(torch.equal(v, own[k]) for k, v in ref.state_dict().items())


def test_wrong_vae_names_are_still_refused(tmp_path, tiny):
    # the conversion renames only what diffusers knows; anything else still fails the strict check
    from safetensors.torch import load_file, save_file
    folder = write_tiny_sd(tmp_path / "bad", "diffusers", comps=tiny[0])
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["encoder.mid_block.attentions.0.queries.weight"] = sd.pop("encoder.mid_block.attentions.0.to_q.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"vae weights do not fit SD v1: 1 missing.*1 unexpected"):
        load_sd(folder)


@pytest.mark.parametrize("fmt", ["ldm-safetensors", "diffusers"])
def test_an_inpainting_unet_is_refused_before_sampling(tmp_path, fmt):
    """SD v1.x inpainting takes 9 channels (latents, mask, masked image): it loaded, then the sampler failed in a
    traceback. One line naming the file instead."""
    from common.sd_export import TINY_TEXT, TINY_UNET, TINY_VAE, build_sd_components
    comps = build_sd_components(dict(TINY_UNET, in_channels=9), TINY_VAE, TINY_TEXT)
    path = write_tiny_sd(tmp_path, fmt, comps=comps)
    with pytest.raises(UserError, match="its UNet takes 9 channels and gives 4, but the VAE's latents have 4: an "
                                        "inpainting model. text-to-image SD v1.x needed") as info:
        load_sd(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_single_file_sd_v1_cannot_build_is_one_line(tmp_path):
    """A UNet 8 channels wide (GroupNorm in 8 groups, which an LDM file does not record) cannot be built with SD
    v1's 32 groups: diffusers' ValueError was a traceback."""
    from common.sd_export import TINY_TEXT, TINY_UNET, TINY_VAE, build_sd_components
    comps = build_sd_components(dict(TINY_UNET, block_out_channels=(8, 8, 16), norm_num_groups=8), TINY_VAE,
                                TINY_TEXT)
    path = write_tiny_sd(tmp_path, "ldm-safetensors", comps=comps)
    with pytest.raises(UserError, match=r"sd.safetensors: its UNet cannot be built as SD v1 from the sizes in the "
                                        r"file \(.*divisible") as info:
        load_sd(path)
    assert "\n" not in str(info.value)
