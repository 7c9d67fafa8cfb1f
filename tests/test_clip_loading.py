"""common.clip_loading: a tiny CLIP saved as OpenAI ships CLIP (a TorchScript archive with fp16 weights) and as
plain state dicts loads to the same model; scripts/evaluate_controlnet.py's CLIP score runs on such a file."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

# head width 64 as in OpenAI's models: open_clip's OpenAI loader infers the number of heads as width // 64
TINY_OPENAI_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
PROMPTS = ["red circle with blue background", "a photo of a dog", "green circle with white background"]


def write_openai_archive(folder: Path, name: str = "tiny-oai", seed: int = 0) -> tuple[Path, Path]:
    """(open_clip config json, TorchScript archive) of a random tiny CLIP, laid out as OpenAI's ViT-B-32.pt:
    a traced model whose state dict holds the weights (matrices in fp16, the rest fp32) and the integer
    entries input_resolution / context_length / vocab_size, with the causal mask a constant, not a tensor."""
    import open_clip
    from open_clip.model import convert_weights_to_lp
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(TINY_OPENAI_CONFIG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, quick_gelu=True).eval()
    lp = copy.deepcopy(model)
    convert_weights_to_lp(lp, torch.float16)  # the tensors OpenAI's archives hold in fp16
    fp16 = {k for k, v in lp.state_dict().items() if v.dtype == torch.float16}
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, key):
            delattr(model, key)
        model.register_buffer(key, torch.tensor(value))
    example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, strict=False, check_trace=False)
    for n, p in traced.named_parameters():
        if n in fp16:
            p.data = p.data.half()
    archive = folder / f"{name}.pt"   # no "openai" in the name: QuickGELU must come from the TorchScript format
    traced.save(str(archive))
    return cfg_path, archive


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    return write_openai_archive(tmp_path_factory.mktemp("oai"))


@pytest.fixture(scope="module")
def reference(openai_clip):
    """The same file through open_clip's own OpenAI loader (what `open_clip.create_model(pretrained=...)`
    cannot read: it torch.loads with weights_only)."""
    import open_clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.load_openai_model(str(openai_clip[1]), precision="fp32", device="cpu")


def features(model, tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_text(tokenizer(PROMPTS)).float(), model.encode_image(images).float()


def test_openai_archive_and_plain_state_dicts_give_the_same_features(openai_clip, reference, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from common.clip_loading import load_clip
    cfg, archive = openai_clip
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref_text, ref_image = features(reference, open_clip.tokenize, images)

    jit = load_clip(str(cfg), archive)
    assert jit.quick_gelu                                   # auto: TorchScript archives are OpenAI's
    text, image = features(jit.model, jit.tokenizer, images)
    assert torch.allclose(text, ref_text, atol=1e-5) and torch.allclose(image, ref_image, atol=1e-5)

    # the archive's tensors saved as plain state dicts (fp16 matrices and the integer entries included)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's files are still TorchScript
        sd = dict(torch.jit.load(str(archive)).state_dict())
    assert sd["visual.conv1.weight"].dtype == torch.float16 and "vocab_size" in sd
    pt, st = tmp_path / "tiny-oai-weights.pt", tmp_path / "tiny-oai-weights.safetensors"
    torch.save(sd, pt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for f in (pt, st):
        plain = load_clip(str(cfg), f, quick_gelu="on")
        assert features(plain.model, plain.tokenizer, images)[0].equal(text), f.name
        assert features(plain.model, plain.tokenizer, images)[1].equal(image), f.name
    # without QuickGELU the same weights give other features: the flag matters
    gelu = load_clip(str(cfg), pt)
    assert not gelu.quick_gelu
    assert not torch.allclose(features(gelu.model, gelu.tokenizer, images)[0], text, atol=1e-4)
    # a file name saying "openai" switches it on by itself
    named = tmp_path / "tiny_openai.pt"
    named.write_bytes(pt.read_bytes())
    assert load_clip(str(cfg), named).quick_gelu


def write_predictions(folder: Path) -> Path:
    """Three 64 px images and a P3 prompt.json naming them; returns the prompt file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"source": f"{i}.png", "target": f"{i}.png", "prompt": prompt}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n")
    return folder / "prompt.json"


def test_evaluate_controlnet_clip_score_with_an_openai_archive(openai_clip, reference, tmp_path, capsys):
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from scripts.evaluate_controlnet import main
    cfg, archive = openai_clip
    pred = tmp_path / "pred"
    prompts = write_predictions(pred)
    code, err = run_cli(main, ["--pred", str(pred), "--prompts", str(prompts), "--clip-weights", str(archive),
                               "--clip-arch", str(cfg), "--device", "cpu", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 3 and not any(s.startswith("clip_score") for s in res["skipped"])

    # the same score from open_clip's own OpenAI loader and transform
    preprocess = open_clip.image_transform(32, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    x = torch.stack([preprocess(Image.open(pred / f"{i}.png").convert("RGB")) for i in range(3)])
    text, image = features(reference, open_clip.tokenize, x)
    cos = torch.nn.functional.cosine_similarity(text, image).numpy()
    assert res["clip_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert res["clip_score"] == pytest.approx(float(100 * np.clip(cos, 0, None).mean()), abs=1e-3)

    # weights of another architecture: one line naming the flag to fix, nothing written
    other = tmp_path / "tiny-other.json"
    other.write_text(json.dumps(dict(TINY_OPENAI_CONFIG, embed_dim=24)))
    code, err = run_cli(main, ["--pred", str(pred), "--prompts", str(prompts), "--clip-weights", str(archive),
                               "--clip-arch", str(other), "--device", "cpu", "--json", str(tmp_path / "bad.json")],
                        capsys)
    assert code == 2 and "do not fit the open_clip model tiny-other" in err and "--clip-arch" in err
    assert not (tmp_path / "bad.json").exists()
