"""scripts/evaluate_ti.py: the grading maths on hand-made embeddings, and the CLI with a tiny open_clip model."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.evaluate_ti import main as evaluate_main
from scripts.evaluate_ti import passes, prompt_scores
from tests.conftest import run_cli
from tests.test_p5_zeroshot import write_tiny_clip

E = torch.eye(4)


def unit(*xs):
    v = torch.tensor(xs, dtype=torch.float32)
    return v / v.norm()


def test_scores_on_hand_made_embeddings():
    photos = torch.stack([E[0], E[1]])                     # two concept photos
    text = E[2]
    generated = torch.stack([
        E[0],                                              # image 100*(1+0)/2 = 50,   text 0
        unit(1, 0, 1, 0),                                  # image 100*(1/sqrt2)/2,     text 100/sqrt2
        unit(1, 1, 0, 0),                                  # image 100*sqrt2/2 = 70.71, text 0
        E[3],                                              # image 0,                   text 0
        unit(0, 0, -1, 0),                                 # image 0,                   text -100
    ])
    s = prompt_scores(generated, photos, text, top_k=2)
    r2 = 1 / math.sqrt(2)
    assert s["image_scores"] == pytest.approx([50, 50 * r2, 100 * r2, 0, 0])
    assert s["text_scores"] == pytest.approx([0, 100 * r2, 0, 0, -100])
    # combined = image + 2.5 text: [50, 35.36 + 176.78, 70.71, 0, -250] -> images 1 then 2
    assert s["selected"] == [1, 2]
    assert s["image"] == pytest.approx((50 * r2 + 100 * r2) / 2)
    assert s["text"] == pytest.approx((100 * r2 + 0) / 2)
    # plain floats, scaled by 100 as the course's grader scales its tensors of cosine similarities
    assert isinstance(s["image"], float) and isinstance(s["text"], float)


def test_top_k_larger_than_the_set_and_ties():
    photos = E[:1]
    generated = torch.stack([E[0], E[1], E[1]])            # combined: 100 + 0, 0 + 250, 0 + 250
    s = prompt_scores(generated, photos, E[1], top_k=5)
    assert s["selected"] == [1, 2, 0]                      # all kept; ties in index order
    assert s["image"] == pytest.approx(100 / 3) and s["text"] == pytest.approx(200 / 3)
    s = prompt_scores(generated, photos, E[1], top_k=2)
    assert s["selected"] == [1, 2] and s["text"] == pytest.approx(100) and s["image"] == pytest.approx(0)


def test_multi_concept_image_score_is_the_mean_over_concepts():
    dog, cat = torch.stack([E[0], E[0]]), torch.stack([E[1], unit(1, 1, 0, 0)])
    generated = torch.stack([E[0], unit(1, 1, 0, 0)])
    s = prompt_scores(generated, [dog, cat], E[2], top_k=5)
    r2 = 1 / math.sqrt(2)
    per_image_cat = [(0 + 100 * r2) / 2, (100 * r2 + 100) / 2]
    per_image_dog = [100, 100 * r2]
    assert s["image_scores"] == pytest.approx([(d + c) / 2 for d, c in zip(per_image_dog, per_image_cat)])
    assert s["image_per_concept"] == pytest.approx([np.mean(per_image_dog), np.mean(per_image_cat)])
    # one photo set in a list is the single-concept score
    single = prompt_scores(generated, dog, E[2])
    assert single["image_scores"] == prompt_scores(generated, [dog], E[2])["image_scores"]


def test_pass_needs_both_baselines():
    assert passes(60.0, 30.0, (60.0, 30.0))                # meeting the baseline exactly passes
    assert not passes(59.99, 35.0, (60.0, 30.0))
    assert not passes(70.0, 29.99, (60.0, 30.0))


@pytest.fixture(scope="module")
def ti_setup(tmp_path_factory):
    """A tiny CLIP, two concepts' photos, input.json and a generated tree OUT/<c>/<p>/*.png."""
    root = tmp_path_factory.mktemp("evalti")
    cfg, weights = write_tiny_clip(root / "clip", "tiny-eval")
    rng = np.random.default_rng(1)
    for name in ("dog", "1"):
        (root / "data" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "data" / name / f"{k}.jpg")
    spec = {
        "0": {
            "src_image": "dog",
            "token_name": "<new1>",
            "prompt": ["a <new1> on grass", "a <new1> swimming"],
            "prompt_4_clip_eval": ["a dog on grass", "a dog swimming"],
            "baseline": [[99.0, -100.0], [-100.0, -100.0]],
        },
        # the course names style folders by key: src_image "David Revoy" is found as data/1/
        "1": {
            "src_image": "David Revoy",
            "token_name": "<new2>",
            "prompt": ["a cat in <new2> style"],
            "prompt_4_clip_eval": ["a cat in David Revoy style"],
            "baseline": [[100.0, 100.0]],
        },
        # both concepts in one prompt, no baseline: scored, not graded
        "2": {
            "src_image": ["dog", "1"],
            "token_name": ["<new1>", "<new2>"],
            "prompt": ["a <new1> in <new2> style"],
            "prompt_4_clip_eval": ["a dog in David Revoy style"],
        },
    }
    (root / "input.json").write_text(json.dumps(spec))
    gen = root / "gen"
    photo = root / "data" / "dog" / "0.jpg"
    for p in range(2):
        (gen / "0" / str(p)).mkdir(parents=True)
        for k in range(6):  # every generated image of concept 0 is its (only kept) photo -> image score 100 vs it
            Image.open(photo).save(gen / "0" / str(p) / f"source0_prompt{p}_{k}.png")
    for key in ("1", "2"):
        (gen / key / "0").mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                gen / key / "0" / f"source{key}_prompt0_{k}.png"
            )
    return root, cfg, weights


def test_cli_scores_and_report(ti_setup, tmp_path, capsys):
    root, cfg, weights = ti_setup
    only_dog = root / "data_one"
    (only_dog / "dog").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "data" / "dog" / "0.jpg", only_dog / "dog" / "0.jpg")
    shutil.copytree(root / "data" / "1", only_dog / "1", dirs_exist_ok=True)
    report = tmp_path / "r.json"
    code, err = run_cli(evaluate_main, ["--json", str(root / "input.json"), "--input-dir", str(only_dog),
                                        "--output-dir", str(root / "gen"), "--clip-weights", str(weights),
                                        "--clip-model", str(cfg), "--report", str(report)], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["total"] == 4 and r["graded"] == 3 and r["top_k"] == 5
    first = r["prompts"][0]
    assert first["concept"] == "0" and len(first["kept"]) == 5 and first["images"] == 6
    # the generated images are the concept's one photo (PNG of the same pixels): cosine 1
    assert first["image_score"] == pytest.approx(100.0, abs=1e-3)
    assert first["pass"] is True and r["prompts"][1]["pass"] is True
    assert r["prompts"][2]["pass"] is False and r["passed"] == 2
    assert len(r["prompts"][2]["kept"]) == 3
    multi = r["prompts"][3]
    assert multi["pass"] is None and multi["baseline"] is None
    assert set(multi["image_score_per_concept"]) == {"dog", "1"}
    assert multi["image_score"] == pytest.approx(np.mean(list(multi["image_score_per_concept"].values())))
    # text score agrees with a direct computation
    from common.clip_loading import encode_image_files, encode_texts, load_clip
    b = load_clip(str(cfg), weights)
    gen = sorted((root / "gen" / "0" / "0").glob("*.png"))[:1]
    direct = 100 * float(encode_image_files(b, gen)[0] @ encode_texts(b, ["a dog on grass"])[0])
    assert first["text_score"] == pytest.approx(direct, abs=1e-3)
    code, _ = run_cli(evaluate_main, ["--json", str(root / "input.json"), "--input-dir", str(only_dog),
                                      "--output-dir", str(root / "gen"), "--clip-weights", str(weights),
                                      "--clip-model", str(cfg), "--strict"], capsys)
    assert code == 1


def test_cli_bad_inputs(ti_setup, tmp_path, capsys):
    root, cfg, weights = ti_setup
    base = ["--input-dir", str(root / "data"), "--output-dir", str(root / "gen"), "--clip-weights", str(weights),
            "--clip-model", str(cfg)]
    bad = tmp_path / "bad.json"
    bad.write_text("{\"0\": {\"src_image\": \"dog\"")
    code, err = run_cli(evaluate_main, ["--json", str(bad)] + base, capsys)
    assert code == 2 and "malformed JSON" in err
    spec = json.loads((root / "input.json").read_text())
    spec["0"]["baseline"] = [[60, 30]]
    bad.write_text(json.dumps(spec))
    code, err = run_cli(evaluate_main, ["--json", str(bad)] + base, capsys)
    assert code == 2 and "2 prompts but 1 baseline pairs" in err
    spec = json.loads((root / "input.json").read_text())
    del spec["1"]["prompt_4_clip_eval"]
    bad.write_text(json.dumps(spec))
    code, err = run_cli(evaluate_main, ["--json", str(bad)] + base, capsys)
    assert code == 2 and "needs \"prompt_4_clip_eval\"" in err
    code, err = run_cli(evaluate_main, ["--json", str(root / "input.json"), "--input-dir", str(tmp_path),
                                        "--output-dir", str(root / "gen"), "--clip-weights", str(weights),
                                        "--clip-model", str(cfg)], capsys)
    assert code == 2 and "'dog'" in err and "holding the photos of entry '0'" in err
    partial = tmp_path / "gen"
    shutil.copytree(root / "gen" / "0", partial / "0")
    code, err = run_cli(evaluate_main, ["--json", str(root / "input.json"), "--input-dir", str(root / "data"),
                                        "--output-dir", str(partial), "--clip-weights", str(weights),
                                        "--clip-model", str(cfg)], capsys)
    assert code == 2 and "no generated images for concept '1', prompt 0" in err
