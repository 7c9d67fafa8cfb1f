"""P5 CLIP zero-shot: a tiny open_clip model (config and random weights written by the test) on synthetic images."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: Path, name: str = "tiny-clip", seed: int = 0, fmt: str = "safetensors",
                    config: dict | None = None) -> tuple[Path, Path]:
    """(config json, weights file) of a randomly initialised tiny open_clip CLIP."""
    import open_clip
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(config or TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        weights = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    elif fmt == "pt":
        weights = folder / f"{name}.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    elif fmt == "jit":  # the layout of OpenAI's released ViT-B-32.pt: a TorchScript archive of the model
        weights = folder / f"{name}_openai.pt"
        example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
        torch.jit.trace(model, example, strict=False, check_trace=False).save(str(weights))
    else:
        raise ValueError(fmt)
    return cfg_path, weights


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def write_synthetic_set(folder: Path, classes: int = 3, per_class: int = 4) -> None:
    """Images whose colour depends on the class (plus noise), named <classid>_<n>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = np.zeros(3)
        base[c % 3] = 200
        for n in range(per_class):
            img = np.clip(base + rng.normal(0, 40, (36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{c}_{n}.png")


LABELS = {"0": "dog", "1": "cat", "2": "airplane"}


@pytest.fixture(scope="module")
def zeroshot_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    write_synthetic_set(root / "val")
    (root / "id2label.json").write_text(json.dumps(LABELS))
    return root


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_weight_formats_load_the_same_model(tmp_path):
    """open_clip safetensors, a torch.save'd 'state_dict' with DDP prefixes and an OpenAI-style TorchScript archive."""
    from common.clip_loading import encode_texts, load_clip
    cfg, st = write_tiny_clip(tmp_path, "tiny-fmt", seed=3, fmt="safetensors")
    _, pt = write_tiny_clip(tmp_path, "tiny-fmt", seed=3, fmt="pt")
    _, jit = write_tiny_clip(tmp_path, "tiny-fmt", seed=3, fmt="jit")
    feats = {}
    for f in (st, pt, jit):
        b = load_clip(str(cfg), f, quick_gelu="off")
        feats[f.name] = encode_texts(b, ["a photo of a dog", "a cat"])
    ref = feats[st.name]
    assert ref.shape == (2, 16)
    for k, v in feats.items():
        assert torch.equal(v, ref), k
    assert load_clip(str(cfg), jit).quick_gelu  # auto: OpenAI archives use QuickGELU
    assert not load_clip(str(cfg), st).quick_gelu


def test_zeroshot_csv_summary_and_figure_agree(tiny_clip, zeroshot_data, tmp_path, capsys):
    from common.clip_loading import encode_images, encode_texts, load_clip
    from p5_personalization import clip_zeroshot
    cfg, weights = tiny_clip
    out = tmp_path / "out"
    templates = ["A photo of a {}.", "a drawing of a {}."]
    code, err = run_cli(clip_zeroshot.main, ["--data", str(zeroshot_data / "val"), "--labels",
                                             str(zeroshot_data / "id2label.json"), "--model", str(cfg),
                                             "--weights", str(weights), "--out", str(out), "--batch-size", "5",
                                             "--templates", *templates, "--quiet"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["filename"] for r in rows] == [f"{c}_{n}.png" for c in range(3) for n in range(4)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 12 and summary["classes"] == 3
    assert [s["template"] for s in summary["single_template"]] == templates

    # recompute the ensemble's predictions independently of the script's batching and einsum
    b = load_clip(str(cfg), weights)
    names = [LABELS[str(i)] for i in range(3)]
    text = torch.stack([encode_texts(b, [t.format(n) for n in names]) for t in templates]).mean(0)
    text = torch.nn.functional.normalize(text, dim=-1)
    imgs = torch.stack([b.preprocess(Image.open(zeroshot_data / "val" / r["filename"]).convert("RGB")) for r in rows])
    probs = (b.model.logit_scale.exp() * encode_images(b, imgs) @ text.T).softmax(-1)
    for r, p in zip(rows, probs):
        assert int(r["pred_id"]) == int(p.argmax())
        assert r["pred_label"] == LABELS[r["pred_id"]] and r["true_label"] == LABELS[r["true_id"]]
        assert abs(float(r["confidence"]) - float(p.max())) < 1e-4
        assert int(r["correct"]) == int(r["pred_id"] == r["true_id"])
    acc = np.mean([int(r["correct"]) for r in rows])
    assert summary["ensemble"]["accuracy"] == pytest.approx(acc)
    n_correct = int(round(acc * 12))
    assert summary["figure"] == {"successes": min(5, n_correct), "failures": min(5, 12 - n_correct)}
    with Image.open(out / "cases.png") as fig:
        assert fig.size[0] > 500 and fig.size[1] > 300
    assert not list(out.glob(".*tmp"))


def test_single_template_ensemble_equals_that_template(tiny_clip, zeroshot_data, tmp_path, capsys):
    from p5_personalization import clip_zeroshot
    cfg, weights = tiny_clip
    out = tmp_path / "one"
    code, err = run_cli(clip_zeroshot.main, ["--data", str(zeroshot_data / "val"), "--labels",
                                             str(zeroshot_data / "id2label.json"), "--model", str(cfg),
                                             "--weights", str(weights), "--out", str(out), "--quiet",
                                             "--templates", "a photo of a {}."], capsys)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["ensemble"]["accuracy"] == s["single_template"][0]["accuracy"]


def test_issue_command_line_without_out_writes_the_default_folder(tiny_clip, zeroshot_data, tmp_path, monkeypatch,
                                                                   capsys):
    """The command line of the issue (--data --labels --model --weights, no --out) runs."""
    from p5_personalization import clip_zeroshot
    cfg, weights = tiny_clip
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(clip_zeroshot.main, ["--data", str(zeroshot_data / "val"), "--labels",
                                             str(zeroshot_data / "id2label.json"), "--model", str(cfg),
                                             "--weights", str(weights), "--quiet"], capsys)
    assert code == 0, err
    out = tmp_path / clip_zeroshot.DEFAULT_OUT
    assert out == tmp_path / "runs" / "p5_zeroshot"
    assert {f.name for f in out.iterdir()} == {"predictions.csv", "summary.json", "cases.png"}
    assert "runs/p5_zeroshot" in clip_zeroshot.build_parser().format_help()


def test_zeroshot_bad_inputs(tiny_clip, zeroshot_data, tmp_path, capsys):
    from p5_personalization import clip_zeroshot
    cfg, weights = tiny_clip
    base = ["--data", str(zeroshot_data / "val"), "--labels", str(zeroshot_data / "id2label.json"),
            "--model", str(cfg), "--weights", str(weights), "--quiet"]

    def run(*changes, out="o"):
        argv = list(base) + ["--out", str(tmp_path / out)]
        for flag, value in changes:
            argv[argv.index(flag) + 1] = value
        return run_cli(clip_zeroshot.main, argv, capsys)

    code, err = run(("--weights", str(tmp_path / "missing.pt")))
    assert code == 2 and "not found" in err and "nothing is downloaded" in err
    other_cfg = dict(TINY_CLIP_CONFIG, embed_dim=24)
    other_cfg_path, _ = write_tiny_clip(tmp_path / "other", "tiny-other", config=other_cfg)
    code, err = run(("--model", str(other_cfg_path)))
    assert code == 2 and "do not fit the open_clip model tiny-other" in err and "--clip-arch" in err
    # --clip-weights / --clip-arch: the names of evaluate_controlnet and evaluate_ti (--weights, --model: aliases)
    renamed = [{"--model": "--clip-arch", "--weights": "--clip-weights"}.get(a, a) for a in base]
    code, err = run_cli(clip_zeroshot.main, renamed + ["--out", str(tmp_path / "o"), "--data",
                                                       str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "image folder not found" in err  # parsed: it got as far as the images
    code, err = run(("--model", "No-Such-Model"))
    assert code == 2 and "not an open_clip architecture" in err
    bad_labels = tmp_path / "bad.json"
    bad_labels.write_text("{\"0\": \"dog\",")
    code, err = run(("--labels", str(bad_labels)))
    assert code == 2 and "malformed JSON" in err
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"0": "dog", "1": "cat"}))
    code, err = run(("--labels", str(few)))
    assert code == 2 and "2_0.png" in err and "not in the label file" in err
    code, err = run(("--data", str(tmp_path / "nowhere")))
    assert code == 2 and "image folder not found" in err
    (tmp_path / "notimg").mkdir()
    (tmp_path / "notimg" / "0_0.png").write_bytes(b"not a png")
    code, err = run(("--data", str(tmp_path / "notimg")))
    assert code == 2 and "0_0.png: not a readable image" in err
    assert not (tmp_path / "o").exists()  # failed runs write nothing


def test_template_file_may_start_with_a_byte_order_mark(tmp_path):
    """A byte-order mark (Notepad) is no whitespace to strip: it stayed at the head of the first template."""
    from p5_personalization.clip_zeroshot import parse_templates
    f = tmp_path / "templates.txt"
    f.write_bytes(b"\xef\xbb\xbfa photo of a {}.\nart of the {}.\n")
    assert parse_templates([str(f)]) == ["a photo of a {}.", "art of the {}."]
