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
                                        "--clip-arch", str(cfg), "--report", str(report)], capsys)
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


# ------------------------------------------------------------------------------- --judge fill50k

def _fill50k_image(circles, background: str, size: int = 64) -> np.ndarray:
    """make_fill50k's own painter: circles (cx, cy, r as shares of the side, colour, striped) on a background."""
    from PIL import ImageColor

    from p3_controlnet.make_fill50k import _fill
    rgb = lambda name: tuple(ImageColor.getrgb(name)[:3])  # noqa: E731
    image = Image.new("RGB", (size, size), rgb(background))
    for cx, cy, r, colour, striped in circles:
        box = [(cx - r) * size, (cy - r) * size, (cx + r) * size, (cy + r) * size]
        _fill(image, box, rgb(colour), rgb(background), "stripes" if striped else None)
    return np.asarray(image)


MINI_SPEC = {
    "0": {"src_image": "new1", "token_name": "<new1>",
          "prompt": ["a <new1> circle with navy background", "<new1> circle with pink background."]},
    "1": {"src_image": "new2", "token_name": "<new2>",
          "prompt": ["<new2> red circle with navy background", "a blue circle in <new2> style with yellow background"]},
    "2": {"src_image": ["new1", "new2"], "token_name": ["<new1>", "<new2>"],
          "prompt": ["a <new1> circle and a <new2> blue circle with pink background."]},
}
# per prompt: (circles, background) of the 4 right images, and a wrong 5th
ONE = (0.5, 0.5, 0.25)
LEFT, RIGHT = (0.27, 0.5, 0.17), (0.73, 0.5, 0.17)
MINI_IMAGES = {
    ("0", 0): (([(*ONE, "chartreuse", False)], "navy"), ([(*ONE, "green", False)], "navy")),
    ("0", 1): (([(*ONE, "chartreuse", False)], "pink"), ([(*ONE, "chartreuse", False)], "orange")),
    ("1", 0): (([(*ONE, "red", True)], "navy"), ([(*ONE, "red", False)], "navy")),
    ("1", 1): (([(*ONE, "blue", True)], "yellow"), ([(*ONE, "red", True)], "yellow")),
    ("2", 0): (([(*LEFT, "chartreuse", False), (*RIGHT, "blue", True)], "pink"),
               ([(*LEFT, "chartreuse", False), (*RIGHT, "blue", False)], "pink")),
}


@pytest.fixture(scope="module")
def mini_ti(tmp_path_factory):
    """input.json for <new1> (chartreuse) and <new2> (stripes), OUT/<c>/<p>/ with 4 right images and a wrong
    one per prompt, and the init-word baseline: its prompts, and images drawn in the init word's colour."""
    root = tmp_path_factory.mktemp("mini_ti")
    (root / "input.json").write_text(json.dumps(MINI_SPEC))
    init = json.loads(json.dumps(MINI_SPEC))
    for e in init.values():
        e["prompt"] = [p.replace("<new1>", "green").replace("<new2>", "white") for p in e["prompt"]]
    (root / "input_init_word.json").write_text(json.dumps(init))
    for (key, p), (right, wrong) in MINI_IMAGES.items():
        folder = root / "gen" / key / str(p)
        folder.mkdir(parents=True)
        for k in range(4):
            Image.fromarray(_fill50k_image(*right)).save(folder / f"{k}.png")
        Image.fromarray(_fill50k_image(*wrong)).save(folder / "4.png")
        # the baseline drew what the init words say: green circles, plain (white bands nowhere)
        base = root / "base" / key / str(p)
        base.mkdir(parents=True)
        circles = [(cx, cy, r, "green" if c == "chartreuse" else c, False) for cx, cy, r, c, _ in right[0]]
        for k in range(3):
            Image.fromarray(_fill50k_image(circles, right[1])).save(base / f"{k}.png")
        Image.fromarray(_fill50k_image(*right)).save(base / "3.png")  # one shows the concept anyway
    return root


JUDGE_FLAGS = ["--judge", "fill50k", "--alias", "<new1>=chartreuse", "--style-token", "<new2>=stripes"]


def test_fill50k_judge_scores_concepts(mini_ti, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, err = run_cli(evaluate_main, ["--json", str(mini_ti / "input.json"), "--output-dir", str(mini_ti / "gen"),
                                        *JUDGE_FLAGS, "--report", str(report)], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["judge"] == "fill50k" and r["total"] == 5 and r["aliases"] == {"<new1>": "chartreuse"}
    by = {(x["concept"], x["prompt_index"]): x for x in r["prompts"]}
    assert all(x["images"] == 5 and x["concept_share"] == pytest.approx(0.8) for x in by.values())
    # <new1>: the circle colour is the token's; the 5th image is green (0, 0) or on the wrong background (0, 1)
    a, b = by[("0", 0)], by[("0", 1)]
    assert a["judged_as"]["circles"] == ["<new1>"] and a["judged_as"]["striped"] == [False]
    assert a["token_colour_share"] == pytest.approx(0.8) and a["striped_share"] is None
    assert b["token_colour_share"] == 1.0 and b["background_right_share"] == pytest.approx(0.8)
    assert a["verdicts"][4]["file"] == "4.png" and a["verdicts"][4]["concept"] is False
    # <new2>: the token leaves the prompt, its circle must be striped; the 5th is plain (1, 0) or red (1, 1)
    c, d = by[("1", 0)], by[("1", 1)]
    assert c["judged_as"]["circles"] == ["red"] and c["judged_as"]["striped"] == [True]
    assert c["striped_share"] == pytest.approx(0.8) and c["colour_following_share"] == 1.0
    assert d["judged_as"]["circles"] == ["blue"] and d["striped_share"] == 1.0
    assert d["colour_following_share"] == pytest.approx(0.8) and d["token_colour_share"] is None
    # both tokens: a chartreuse circle left, a striped blue one right
    e = by[("2", 0)]
    assert e["judged_as"]["circles"] == ["<new1>", "blue"] and e["judged_as"]["striped"] == [False, True]
    assert e["token_colour_share"] == 1.0 and e["striped_share"] == pytest.approx(0.8)
    assert r["concepts"]["0"]["images"] == 10 and r["concepts"]["0"]["concept_share"] == pytest.approx(0.8)
    assert r["mean_concept_share"] == pytest.approx(0.8)


def test_fill50k_judge_init_word_baseline(mini_ti, tmp_path, capsys):
    """Images made from the init-word prompts, judged against the concept with --expect-concept: green is not
    chartreuse, plain is not striped; only the image that shows the concept counts."""
    args = ["--json", str(mini_ti / "input_init_word.json"), "--output-dir", str(mini_ti / "base"), *JUDGE_FLAGS,
            "--expect-concept", "<new1>=green", "--expect-concept", "<new2>=White",
            "--report", str(tmp_path / "b.json")]
    code, err = run_cli(evaluate_main, args, capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["expect_concept"] == {"<new1>": "green", "<new2>": "white"}
    for x in r["prompts"]:
        assert x["concept_share"] == pytest.approx(0.25), x["prompt"]
    first = r["prompts"][0]
    assert first["prompt"] == "a green circle with navy background"
    assert first["judged_as"]["text"] == "a <new1> circle with navy background"
    assert r["prompts"][2]["judged_as"]["circles"] == ["red"] and r["prompts"][2]["judged_as"]["striped"] == [True]
    # the same images judged as plain prompts (no --expect-concept): green circles are right, nothing to learn
    code, err = run_cli(evaluate_main, ["--json", str(mini_ti / "input_init_word.json"), "--output-dir",
                                        str(mini_ti / "base"), "--judge", "fill50k", "--report",
                                        str(tmp_path / "p.json")], capsys)
    assert code == 2 and "'white red' is not a colour the judge knows" in err  # "white red circle": unreadable


def test_fill50k_judge_bad_inputs(mini_ti, tmp_path, capsys):
    base = ["--json", str(mini_ti / "input.json"), "--output-dir", str(mini_ti / "gen"), "--judge", "fill50k"]

    def fails(args, *needles):
        code, err = run_cli(evaluate_main, args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        for n in needles:
            assert n in err, (n, err)

    style = ["--style-token", "<new2>=stripes"]
    fails(base + ["--alias", "<new1>chartreuse"] + style, "--alias '<new1>chartreuse': expected TOKEN=COLOUR")
    fails(base + ["--alias", "=chartreuse"] + style, "--alias '=chartreuse'")
    fails(base + ["--alias", "<new1>=chartruse"] + style, "'chartruse' is not a colour the judge knows")
    fails(base + ["--alias", "<new1>=chartreuse", "--style-token", "<new2>=dots"], "--style-token <new2>=dots")
    fails(base + ["--alias", "<new1>=chartreuse"], "input.json: entry '1' prompt 0", "token <new2> has no --alias")
    fails(base + JUDGE_FLAGS[2:] + ["--expect-concept", "<new1>=lime"], "--expect-concept <new1>=lime",
          "holds the word 'lime'")
    fails(base + JUDGE_FLAGS[2:] + ["--expect-concept", "<new3>=green"], "<new3> is given by neither")
    fails(base + JUDGE_FLAGS[2:] + ["--strict"], "--strict")
    spec = json.loads(json.dumps(MINI_SPEC))
    spec["0"]["prompt"][1] = "a photo of a <new1> dog"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    fails(["--json", str(bad)] + base[2:] + JUDGE_FLAGS[2:], "bad.json: entry '0' prompt 1 'a photo of a <new1> dog'",
          "not a Fill50k prompt")
    partial = tmp_path / "gen"
    shutil.copytree(mini_ti / "gen" / "0", partial / "0")
    fails(["--json", str(mini_ti / "input.json"), "--output-dir", str(partial)] + JUDGE_FLAGS,
          "no generated images for concept '1', prompt 0")
    # the CLIP judge still needs its weights and photos, and the judge flags are not for it
    fails(["--json", str(mini_ti / "input.json"), "--output-dir", str(mini_ti / "gen")], "--judge clip needs")
    fails(["--json", str(mini_ti / "input.json"), "--output-dir", str(mini_ti / "gen"), "--alias", "<a>=red"],
          "--alias is for --judge fill50k")
